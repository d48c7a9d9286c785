"""`nfed bench aggregate`'s engine: FedAvg of K models of P parameters, in GB/s, against the device's copy
bandwidth measured in the same run (cudaMemcpy device-to-device; on the CPU a NumPy copy), and against
PyTorch's weighted sum (a GEMV over the stacked models) when torch imports.

On a GPU nfed's kernel row times what the aggregator runs for CuPy weights: nfed.gpu.fedavg's one-pass
accumulation of each float32 model into a float64 running sum; its bandwidth counts the bytes that kernel
moves (each model read, the float64 sum read and written per model). The aggregator row times
nfed.federation.aggregator.fedavg itself (validation included) against the minimum traffic.
"""
from __future__ import annotations

import numpy as np

from nfed.benchmarks.gpu import device_name, import_torch, median_seconds, on_device, torch_setup
from nfed.common import backend


def _copy_bandwidth(device: backend.Device, nbytes: int, repeat: int, warmup: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    xp = device.xp
    n = max(1, nbytes // 4)
    src = xp.ones(n, dtype=np.float32)
    dst = xp.empty_like(src)
    if device.is_gpu:
        cp = backend.cupy_module()
        kind = cp.cuda.runtime.memcpyDeviceToDevice

        def copy():
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, kind,
                                        cp.cuda.get_current_stream().ptr)
    else:
        def copy():
            np.copyto(dst, src)
    seconds = median_seconds(copy, lambda: backend.synchronize(device), repeat, warmup)
    return 2 * src.nbytes / seconds


def run_aggregate_bench(device: backend.Device, models: int, parameters: int, repeat: int, warmup: int,
                        reference: bool) -> dict:
    """FedAvg of `models` flat float32 models of `parameters` values on one device."""
    from nfed.federation.aggregator import fedavg  # noqa: PLC0415

    xp = device.xp
    rng = np.random.default_rng(0)
    sample_counts = rng.integers(50, 500, size=models)
    weights = sample_counts / sample_counts.sum()
    moved = (models + 1) * parameters * 4  # every model read once, the average written once
    result = {"device": str(device), "device_name": device_name(device), "models": models,
              "parameters": parameters, "bytes_moved": moved}
    sync = lambda: backend.synchronize(device)  # noqa: E731
    with on_device(device):
        stack = [xp.full(parameters, float(i), dtype=np.float32) for i in range(models)]
        copy_bw = _copy_bandwidth(device, parameters * 4, repeat, warmup)
        result["copy_gb_s"] = copy_bw / 1e9
        if device.is_gpu:  # the aggregator's device path: one pass per model into a float64 running sum
            from nfed.gpu import fedavg as gpu_fedavg  # noqa: PLC0415

            out = xp.zeros(parameters, dtype=np.float64)

            def average():
                out.fill(0)
                for w, a in zip(weights, stack):
                    gpu_fedavg.weighted_accumulate(out, a, float(w))
            kernel_moved = parameters * 8 + models * parameters * (4 + 2 * 8)
        else:
            out = np.empty(parameters, dtype=np.float32)

            def average():
                np.multiply(stack[0], np.float32(weights[0]), out=out)
                for w, a in zip(weights[1:], stack[1:]):
                    np.add(out, np.float32(w) * a, out=out)
            kernel_moved = moved
        seconds = median_seconds(average, sync, repeat, warmup)
        expected = float(np.dot(weights, np.arange(models)))
        result["check_max_error"] = float(abs(float(out[0]) - expected) + abs(float(out[-1]) - expected))
        result.update({"nfed_kernel_s": seconds, "nfed_kernel_bytes_moved": kernel_moved,
                       "nfed_kernel_gb_s": kernel_moved / seconds / 1e9,
                       "nfed_kernel_fraction_of_copy": kernel_moved / seconds / copy_bw})
        # The aggregator as the federation runs it (state dicts, float64 running sum), 2 repeats: slow path.
        updates = [({"w": a}, int(c)) for a, c in zip(stack, sample_counts)]
        agg_s = median_seconds(lambda: fedavg(updates), sync, max(1, min(repeat, 2)), 0)
        result.update({"aggregator_s": agg_s, "aggregator_gb_s": moved / agg_s / 1e9})
        updates = out = None   # freed now (not `del`: the closures above read them)
        torch = import_torch() if reference else None
        if torch is not None:
            tdev = torch_setup(torch, device, "fp32")
            t_stack = torch.empty((models, parameters), dtype=torch.float32, device=tdev)
            for i in range(models):
                t_stack[i].fill_(float(i))
            t_weights = torch.as_tensor(weights, dtype=torch.float32, device=tdev)
            tsync = (lambda: torch.cuda.synchronize(tdev)) if device.is_gpu else (lambda: None)
            t_seconds = median_seconds(lambda: torch.matmul(t_weights, t_stack), tsync, repeat, warmup)
            result.update({"reference": f"torch {torch.__version__} matmul(weights, stacked models)",
                           "reference_s": t_seconds, "reference_gb_s": moved / t_seconds / 1e9,
                           "ratio": t_seconds / seconds})
            del t_stack
            if device.is_gpu:
                torch.cuda.empty_cache()
        else:
            result["reference_note"] = "skipped (--no-reference)" if not reference else "PyTorch is not installed"
        stack = None
        if device.is_gpu:
            backend.cupy_module().get_default_memory_pool().free_all_blocks()
    return result


