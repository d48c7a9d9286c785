"""`nfed bench kernels` and `nfed bench aggregate`: kernel throughput and FedAvg bandwidth, per device.

kernels: every distinct convolution / transposed-convolution call of one W-Net-CD training step (found by
running the model itself at a small probe size and scaling, so the list is exactly what nfed executes,
the siamese encoder's doubled batch included), forward and backward (input + weight + bias gradients),
in TFLOP/s for nfed and for cuDNN through PyTorch (when torch imports) at the same precision, in the same
run, plus peak memory of each side and the per-layer speed ratio (> 1: nfed faster).
aggregate: FedAvg of K models of P parameters, in GB/s (bytes read + written), against the device's
copy bandwidth measured in the same run (cudaMemcpy device-to-device; on CPU a NumPy copy), and against
PyTorch's weighted sum (a GEMV over the stacked models) when torch imports.
Both run on every visible GPU for `--device cuda` (or `all`), print a table and write JSON (--out).
GPU-only code reaches CuPy through nfed.common.backend; torch is imported only here, only when present.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time

import click
import numpy as np

from nfed.common import backend
from nfed.gpu import precision as precision_modes
from nfed.common.atomic import write_json_atomic
from nfed.common.errors import ConfigError
from nfed.commands.options import limited

PROBE_TILE = 16  # W-Net pools four times: the smallest tile that runs; every size scales linearly from it


# --- devices, timing, memory ----------------------------------------------------------------------------

def bench_devices(spec: str | None) -> list[backend.Device]:
    """`cuda`/`all`/`gpu` -> every visible GPU; `cuda:N` -> that one; `cpu` -> the CPU."""
    text = (spec or os.environ.get(backend.ENV_DEVICE) or "cpu").strip().lower()
    if text in ("all", "cuda", "gpu"):
        backend.parse_device("cuda")  # the clear error when there is no GPU or no CuPy
        return [backend.Device("cuda", i) for i in range(backend.gpu_count())]
    return [backend.parse_device(text)]


def device_name(device: backend.Device) -> str:
    if not device.is_gpu:
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    cp = backend.cupy_module()
    name = cp.cuda.runtime.getDeviceProperties(device.index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def on_device(device: backend.Device):
    """Context that makes `device` current (backend.Device's own `with` cannot be used: it is frozen)."""
    if device.is_gpu:
        return backend.cupy_module().cuda.Device(device.index)
    return contextlib.nullcontext()


def median_seconds(fn, sync, repeat: int, warmup: int) -> float:
    """Median wall time of fn() over `repeat` runs after `warmup` runs, synchronising around each."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _PeakMemory:
    """Peak bytes taken from CuPy's memory pool inside the `with` block (relative to its start)."""

    def __init__(self):
        cp = backend.cupy_module()

        class Hook(cp.cuda.MemoryHook):
            name = "nfed_bench_peak"

            def __init__(self):
                super().__init__()
                self.current = 0
                self.peak = 0

            def malloc_postprocess(self, **kwargs):
                self.current += kwargs["mem_size"]
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kwargs):
                self.current -= kwargs["mem_size"]

        self.hook = Hook()

    def __enter__(self):
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hook.__exit__(*exc)

    @property
    def peak(self) -> int:
        return self.hook.peak


def _import_torch():
    try:
        import torch  # noqa: PLC0415 - optional reference, bench only
    except Exception:
        return None
    return torch


def _torch_setup(torch, device: backend.Device, precision: str):
    """torch.device for `device`, with cuDNN/cuBLAS precision set to match nfed's mode."""
    if device.is_gpu:
        allow = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = allow  # PyTorch's default is True: fp32 must switch it off
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.benchmark = True  # cuDNN's best algorithm per shape (tuned during warm-up)
        return torch.device("cuda", device.index)
    return torch.device("cpu")


def _emit(result: dict, as_json: bool, out: str | None, table) -> None:
    if out:
        write_json_atomic(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        table(result)


def _geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# --- W-Net-CD layer shapes --------------------------------------------------------------------------------

def _probe_calls(width: int, classes: int, lambda_rec: float) -> list[tuple]:
    """(kind, x shape, weight shape, stride, padding) of every conv call in one forward at the probe size."""
    from nfed.model import wnet  # noqa: PLC0415
    from nfed.core.autograd import no_grad  # noqa: PLC0415
    from nfed.core.functions import conv as conv_module  # noqa: PLC0415
    from nfed.core.functions import fused  # noqa: PLC0415

    calls = []
    conv2d_forward = conv_module.conv2d_forward
    conv_transpose2d_forward = conv_module.conv_transpose2d_forward

    def record_conv(x, w, b=None, stride=1, padding=0):
        calls.append(("conv", tuple(x.shape), tuple(w.shape), stride, padding))
        return conv2d_forward(x, w, b, stride, padding)

    def record_deconv(x, w, b=None, stride=2, padding=0):
        calls.append(("deconv", tuple(x.shape), tuple(w.shape), stride, padding))
        return conv_transpose2d_forward(x, w, b, stride, padding)

    model = wnet.WNetCD(width=width, classes=classes, lambda_rec=lambda_rec, rng=np.random.default_rng(0))
    pair = np.zeros((1, 3, PROBE_TILE, PROBE_TILE), dtype=np.float32)
    conv_module.conv2d_forward, conv_module.conv_transpose2d_forward = record_conv, record_deconv
    fused.ENABLED, enabled = False, fused.ENABLED  # every convolution through conv2d_forward
    try:
        with no_grad():
            model(pair, pair)
    finally:
        conv_module.conv2d_forward, conv_module.conv_transpose2d_forward = conv2d_forward, conv_transpose2d_forward
        fused.ENABLED = enabled
    return calls


def wnet_layer_shapes(width: int, tile: int, batch: int, classes: int = 2, lambda_rec: float = 0.1) -> list[dict]:
    """Distinct conv/deconv calls of one W-Net-CD forward at (width, tile, batch), with how many layers
    share each shape. Channel counts are affine in the width (probed at widths 1 and 2), sizes linear in
    the tile (probed at 16) and batches a multiple of the batch (2x in the siamese encoder)."""
    if tile < PROBE_TILE or tile % PROBE_TILE:
        raise ConfigError(f"--tile {tile}: must be a positive multiple of {PROBE_TILE}")
    one, two = _probe_calls(1, classes, lambda_rec), _probe_calls(2, classes, lambda_rec)
    scale = tile // PROBE_TILE
    shapes: dict[tuple, dict] = {}
    for (kind, x1, w1, stride, padding), (_, x2, w2, _, _) in zip(one, two):
        w_shape = tuple(a + (b - a) * (width - 1) for a, b in zip(w1, w2))
        c_in = x1[1] + (x2[1] - x1[1]) * (width - 1)
        key = (kind, x1[0] * batch, c_in, x1[2] * scale, x1[3] * scale, w_shape, stride, padding)
        if key in shapes:
            shapes[key]["layers"] += 1
            continue
        n, _, h, w = key[1:5]
        if kind == "conv":
            c_out, k = w_shape[0], w_shape[2]
            ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
            flops = 2.0 * n * c_out * ho * wo * c_in * k * w_shape[3]
        else:
            c_out, k = w_shape[1], w_shape[2]
            flops = 2.0 * n * c_in * h * w * c_out * k * w_shape[3]
        shapes[key] = {"kind": kind, "n": n, "c_in": c_in, "c_out": c_out, "h": h, "w": w,
                       "kernel": k, "stride": stride, "padding": padding, "weight_shape": list(w_shape),
                       "forward_flop": flops, "layers": 1}
    return list(shapes.values())


# --- kernels bench ------------------------------------------------------------------------------------------

def _nfed_conv_ops(device: backend.Device):
    if device.is_gpu:
        from nfed.gpu import ops as cuda_ops  # noqa: PLC0415

        return cuda_ops
    from nfed.core.functions import conv  # noqa: PLC0415

    return conv


def _nfed_layer_calls(layer: dict, device: backend.Device):
    """(forward(), backward(), arrays) for one layer on nfed, inputs allocated on the device."""
    ops = _nfed_conv_ops(device)
    xp = device.xp
    rng = np.random.default_rng(0)
    n, c_in, h, w = layer["n"], layer["c_in"], layer["h"], layer["w"]
    s, p = layer["stride"], layer["padding"]
    x = backend.to_device(rng.standard_normal((n, c_in, h, w), dtype=np.float32), device)
    weight = backend.to_device(rng.standard_normal(layer["weight_shape"], dtype=np.float32) * 0.05, device)
    bias = xp.zeros(layer["c_out"], dtype=np.float32)
    if layer["kind"] == "conv":
        forward = lambda: ops.conv2d_forward(x, weight, bias, s, p)  # noqa: E731
        gy = xp.ones_like(forward())

        def backward():
            ops.conv2d_backward_input(gy, weight, x.shape, s, p)
            ops.conv2d_backward_weight(x, gy, weight.shape, s, p)
            ops.conv2d_backward_bias(gy)
    else:
        forward = lambda: ops.conv_transpose2d_forward(x, weight, bias, s, p)  # noqa: E731
        gy = xp.ones_like(forward())

        def backward():
            ops.conv_transpose2d_backward_input(gy, weight, s, p)
            ops.conv_transpose2d_backward_weight(x, gy, weight.shape, s, p)
            ops.conv2d_backward_bias(gy)
    return forward, backward, (x, weight, bias, gy)


def _forward_path(layer, device) -> str | None:
    """The GPU forward algorithm of a layer (deconv forward is a col2im of a GEMM)."""
    if not device.is_gpu:
        return None
    from nfed.gpu import ops as cuda_ops  # noqa: PLC0415

    if layer["kind"] == "deconv":
        return "gemm+col2im"
    k = layer["kernel"]
    return cuda_ops.conv2d_forward_path(layer["c_in"], k, k, layer["stride"], layer["padding"], np.float32)


def _measure_nfed_layer(layer, device, repeat, warmup) -> dict:
    sync = lambda: backend.synchronize(device)  # noqa: E731
    result = {"forward_path": _forward_path(layer, device)}
    with on_device(device):
        forward, backward, arrays = _nfed_layer_calls(layer, device)
        t_fwd = median_seconds(forward, sync, repeat, warmup)
        t_bwd = median_seconds(backward, sync, repeat, warmup)
        if result["forward_path"] in ("direct", "winograd"):  # the GEMM alternative: which wins per shape
            from nfed.gpu import ops as cuda_ops  # noqa: PLC0415

            saved = os.environ.get(cuda_ops.ENV_CONV_ALGORITHM)
            os.environ[cuda_ops.ENV_CONV_ALGORITHM] = "im2col"
            try:
                result["forward_s_im2col_gemm"] = median_seconds(forward, sync, repeat, warmup)
                result["backward_s_im2col_gemm"] = median_seconds(backward, sync, repeat, warmup)
            finally:
                if saved is None:
                    del os.environ[cuda_ops.ENV_CONV_ALGORITHM]
                else:
                    os.environ[cuda_ops.ENV_CONV_ALGORITHM] = saved
        del forward, backward, arrays
        peak = None
        if device.is_gpu:
            cp = backend.cupy_module()
            cp.get_default_memory_pool().free_all_blocks()
            with _PeakMemory() as tracker:
                f, b, arrays = _nfed_layer_calls(layer, device)
                f()
                b()
                sync()
                del f, b, arrays
            peak = tracker.peak
            cp.get_default_memory_pool().free_all_blocks()
    result.update({"forward_s": t_fwd, "backward_s": t_bwd, "peak_bytes": peak})
    return result


def _measure_torch_layer(torch, layer, device, precision, repeat, warmup) -> dict:
    tdev = _torch_setup(torch, device, precision)
    dtype = torch.bfloat16 if precision == "bf16" and device.is_gpu else torch.float32
    fn = torch.nn.functional.conv2d if layer["kind"] == "conv" else torch.nn.functional.conv_transpose2d
    s, p = layer["stride"], layer["padding"]
    if device.is_gpu:
        torch.cuda.synchronize(tdev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(tdev)
        base = torch.cuda.memory_allocated(tdev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((layer["n"], layer["c_in"], layer["h"], layer["w"]), generator=gen).to(tdev, dtype)
    weight = (torch.randn(layer["weight_shape"], generator=gen) * 0.05).to(tdev, dtype)
    bias = torch.zeros(layer["c_out"], device=tdev, dtype=dtype)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    sync = (lambda: torch.cuda.synchronize(tdev)) if device.is_gpu else (lambda: None)

    def forward():
        with torch.no_grad():
            return fn(x, weight, bias, stride=s, padding=p)

    y = fn(x, weight, bias, stride=s, padding=p)
    gy = torch.ones_like(y)

    def backward():
        torch.autograd.grad(y, (x, weight, bias), gy, retain_graph=True)

    t_fwd = median_seconds(forward, sync, repeat, warmup)
    t_bwd = median_seconds(backward, sync, repeat, warmup)
    peak = None
    if device.is_gpu:
        peak = int(torch.cuda.max_memory_allocated(tdev) - base)
    del x, weight, bias, y, gy
    if device.is_gpu:
        torch.cuda.empty_cache()
    return {"forward_s": t_fwd, "backward_s": t_bwd, "peak_bytes": peak}


def run_kernels_bench(device: backend.Device, precision: str, width: int, tile: int, batch: int,
                      repeat: int, warmup: int, reference: bool) -> dict:
    """Per-layer timings of nfed (and cuDNN/PyTorch when available) on one device."""
    if not device.is_gpu and precision != "fp32":
        raise ConfigError(f"--precision {precision} needs a GPU; the CPU path computes in fp32")
    layers = wnet_layer_shapes(width, tile, batch)
    torch = _import_torch() if reference else None
    reference_note = None if torch is not None else ("skipped (--no-reference)" if not reference
                                                     else "PyTorch is not installed")
    rows = []
    with precision_modes.precision(precision):
        for layer in layers:
            row = dict(layer)
            nfed = _measure_nfed_layer(layer, device, repeat, warmup)
            row.update({f"nfed_{k}": v for k, v in nfed.items()})
            flop = layer["forward_flop"]
            row["nfed_forward_tflops"] = flop / nfed["forward_s"] / 1e12
            row["nfed_backward_tflops"] = 2 * flop / nfed["backward_s"] / 1e12
            if torch is not None:
                ref = _measure_torch_layer(torch, layer, device, precision, repeat, warmup)
                row.update({f"reference_{k}": v for k, v in ref.items()})
                row["reference_forward_tflops"] = flop / ref["forward_s"] / 1e12
                row["reference_backward_tflops"] = 2 * flop / ref["backward_s"] / 1e12
                row["ratio_forward"] = ref["forward_s"] / nfed["forward_s"]
                row["ratio_backward"] = ref["backward_s"] / nfed["backward_s"]
                row["ratio"] = (ref["forward_s"] + ref["backward_s"]) / (nfed["forward_s"] + nfed["backward_s"])
            rows.append(row)
    return {
        "device": str(device), "device_name": device_name(device), "precision": precision,
        "reference": None if torch is None else f"torch {torch.__version__}"
                                                + (f", cuDNN {torch.backends.cudnn.version()}" if device.is_gpu else ""),
        "reference_note": reference_note,
        "layers": rows,
        "geomean_ratio": _geomean(r.get("ratio") for r in rows),
        "geomean_ratio_forward": _geomean(r.get("ratio_forward") for r in rows),
        "geomean_ratio_backward": _geomean(r.get("ratio_backward") for r in rows),
    }


def _kernels_table(result: dict) -> None:
    cfg = result["config"]
    for dev in result["devices"]:
        click.echo(f"{dev['device']} {dev['device_name']}  precision {dev['precision']}  "
                   f"w={cfg['width']} tile={cfg['tile']} batch={cfg['batch']}  reference: "
                   f"{dev['reference'] or dev['reference_note']}")
        click.echo(f"{'layer':<30}{'n':>4}{'nfed fwd':>10}{'bwd':>8}{'ref fwd':>10}{'bwd':>8}"
                   f"{'ratio':>8}{'peak MB':>9}{'ref MB':>8}")
        for r in dev["layers"]:
            name = f"{r['kind']} {r['c_in']}->{r['c_out']} {r['kernel']}x{r['kernel']}/{r['stride']} @{r['h']}x{r['w']}"
            name += {"direct": " D", "winograd": " W"}.get(r.get("nfed_forward_path"), "")
            ref = (f"{r['reference_forward_tflops']:>10.3g}{r['reference_backward_tflops']:>8.3g}{r['ratio']:>8.2f}"
                   if "ratio" in r else f"{'-':>10}{'-':>8}{'-':>8}")
            mem = lambda v: f"{v / 2**20:.0f}" if v is not None else "-"  # noqa: E731
            click.echo(f"{name:<30}{r['n']:>4}{r['nfed_forward_tflops']:>10.3g}{r['nfed_backward_tflops']:>8.3g}"
                       f"{ref}{mem(r['nfed_peak_bytes']):>9}{mem(r.get('reference_peak_bytes')):>8}")
        if dev["geomean_ratio"] is not None:
            click.echo(f"geometric mean ratio (reference time / nfed time): fwd+bwd {dev['geomean_ratio']:.2f}, "
                       f"fwd {dev['geomean_ratio_forward']:.2f}, bwd {dev['geomean_ratio_backward']:.2f}")
        click.echo("TFLOP/s; backward = input + weight + bias gradients (2x the forward FLOPs); "
                   "D = direct forward, W = Winograd forward and gradients; their im2col+GEMM times are "
                   "in the JSON")


def _common_options(fn):
    fn = click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the JSON result here")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")(fn)
    fn = click.option("--warmup", type=limited("warmup"), default=2, show_default=True, help="untimed runs first")(fn)
    fn = click.option("--repeat", type=limited("repeat"), default=5, show_default=True, help="timed runs (median)")(fn)
    fn = click.option("--device", default=None,
                      help="cpu, cuda:N, or cuda/all for every visible GPU (default $NFED_DEVICE, else cpu)")(fn)
    return fn


@click.command("kernels")
@_common_options
@click.option("--precision", default=None, help="fp32 | tf32 | bf16 GEMMs (default $NFED_PRECISION, else fp32)")
@click.option("--width", type=limited("width"), default=None, help="W-Net base width (default 64 on GPU, 4 on CPU)")
@click.option("--tile", type=limited("tile"), default=None,
              help="tile size, multiple of 16 (default 256 on GPU, 32 on CPU)")
@click.option("--batch", type=limited("batch_size"), default=None,
              help="image pairs per step (default 8 on GPU, 2 on CPU)")
@click.option("--no-reference", is_flag=True, help="time nfed only (no PyTorch)")
def kernels(device, repeat, warmup, as_json, out, precision, width, tile, batch, no_reference):
    """Conv/deconv throughput of every distinct W-Net-CD layer shape, nfed vs cuDNN (PyTorch)."""
    precision = precision_modes.parse_precision(precision)
    devices = bench_devices(device)
    gpu = devices[0].is_gpu
    width = width or (64 if gpu else 4)
    tile = tile or (256 if gpu else 32)
    batch = batch or (8 if gpu else 2)
    if min(width, batch, repeat) < 1 or warmup < 0:
        raise ConfigError("--width, --batch and --repeat must be >= 1 and --warmup >= 0")
    result = {"bench": "kernels", "config": {"width": width, "tile": tile, "batch": batch, "repeat": repeat,
                                             "warmup": warmup, "precision": precision},
              "devices": [run_kernels_bench(d, precision, width, tile, batch, repeat, warmup, not no_reference)
                          for d in devices]}
    _emit(result, as_json, out, _kernels_table)


# --- aggregate bench ----------------------------------------------------------------------------------------

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
        if device.is_gpu:
            from nfed.gpu import ops as cuda_ops  # noqa: PLC0415

            out = xp.empty(parameters, dtype=np.float32)
            seconds = median_seconds(lambda: cuda_ops.weighted_sum(stack, weights, out=out), sync, repeat, warmup)
            expected = float(np.dot(weights, np.arange(models)))
            result["check_max_error"] = float(abs(float(out[0]) - expected) + abs(float(out[-1]) - expected))
        else:
            out = np.empty(parameters, dtype=np.float32)

            def weighted_sum():
                np.multiply(stack[0], np.float32(weights[0]), out=out)
                for w, a in zip(weights[1:], stack[1:]):
                    np.add(out, np.float32(w) * a, out=out)
            seconds = median_seconds(weighted_sum, sync, repeat, warmup)
        result.update({"nfed_kernel_s": seconds, "nfed_kernel_gb_s": moved / seconds / 1e9,
                       "nfed_kernel_fraction_of_copy": moved / seconds / copy_bw})
        # The aggregator as the federation runs it (state dicts, float64 running sum), 2 repeats: slow path.
        updates = [({"w": a}, int(c)) for a, c in zip(stack, sample_counts)]
        agg_s = median_seconds(lambda: fedavg(updates), sync, max(1, min(repeat, 2)), 0)
        result.update({"aggregator_s": agg_s, "aggregator_gb_s": moved / agg_s / 1e9})
        del updates, out
        torch = _import_torch() if reference else None
        if torch is not None:
            tdev = _torch_setup(torch, device, "fp32")
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
        del stack
        if device.is_gpu:
            backend.cupy_module().get_default_memory_pool().free_all_blocks()
    return result


def _aggregate_table(result: dict) -> None:
    for r in result["devices"]:
        click.echo(f"{r['device']} {r['device_name']}: FedAvg of {r['models']} models x {r['parameters']:,} "
                   f"parameters ({r['bytes_moved'] / 1e9:.2f} GB moved)")
        click.echo(f"  copy bandwidth          {r['copy_gb_s']:10.1f} GB/s")
        label = "nfed FedAvg kernel" if r["device"] != "cpu" else "numpy weighted sum"
        click.echo(f"  {label:<23}{r['nfed_kernel_gb_s']:10.1f} GB/s  {r['nfed_kernel_s'] * 1e3:8.2f} ms  "
                   f"({100 * r['nfed_kernel_fraction_of_copy']:.0f}% of copy)")
        click.echo(f"  nfed aggregator.fedavg  {r['aggregator_gb_s']:10.1f} GB/s  {r['aggregator_s'] * 1e3:8.2f} ms")
        if "reference_gb_s" in r:
            click.echo(f"  {'pytorch weighted sum':<23}{r['reference_gb_s']:10.1f} GB/s  {r['reference_s'] * 1e3:8.2f} ms  "
                       f"(reference time / nfed time {r['ratio']:.2f})")


@click.command("aggregate")
@_common_options
@click.option("--models", type=limited("models"), default=25, show_default=True, help="models averaged (districts)")
@click.option("--parameters", type=limited("parameters"), default=None,
              help="parameters per model (default 67.3e6 on GPU, 4e6 on CPU)")
@click.option("--no-reference", is_flag=True, help="time nfed only (no PyTorch)")
def aggregate(device, repeat, warmup, as_json, out, models, parameters, no_reference):
    """FedAvg bandwidth: K models of P parameters, against the device's copy bandwidth in the same run."""
    devices = bench_devices(device)
    parameters = int(parameters or (67.3e6 if devices[0].is_gpu else 4e6))
    if models < 1 or parameters < 1 or repeat < 1 or warmup < 0:
        raise ConfigError("--models, --parameters and --repeat must be >= 1 and --warmup >= 0")
    result = {"bench": "aggregate", "config": {"models": models, "parameters": parameters, "repeat": repeat,
                                               "warmup": warmup},
              "devices": [run_aggregate_bench(d, models, parameters, repeat, warmup, not no_reference)
                          for d in devices]}
    _emit(result, as_json, out, _aggregate_table)


__all__ = ["kernels", "aggregate", "wnet_layer_shapes", "run_kernels_bench", "run_aggregate_bench"]
