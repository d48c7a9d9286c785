"""`nfed bench kernels`'s engine: every distinct convolution / transposed-convolution call of one W-Net-CD
training step, forward and backward (input + weight + bias gradients), timed on nfed and on cuDNN through
PyTorch (when torch imports) at the same precision in the same run, with each side's peak memory.

The layer list is found by running the model itself at a small probe size and scaling, so it is exactly
what nfed executes, the siamese encoder's doubled batch included. On a GPU nfed's side calls nfed.gpu.conv
directly (the op the core dispatches CuPy arrays to); on the CPU, nfed.core.functions.conv.
"""
from __future__ import annotations

import os

import numpy as np

from nfed.benchmarks.gpu import PeakMemory, device_name, geomean, import_torch, median_seconds, on_device, torch_setup
from nfed.common import backend
from nfed.common.errors import ConfigError
from nfed.gpu import precision as precision_modes

PROBE_TILE = 16  # W-Net pools four times: the smallest tile that runs; every size scales linearly from it

# --- W-Net-CD layer shapes --------------------------------------------------------------------------------

def _probe_calls(width: int, classes: int, lambda_rec: float) -> list[tuple]:
    """(kind, x shape, weight shape, stride, padding) of every conv call in one forward at the probe size,
    in call order (observed through autograd's op_timer hook; the fused conv -> BN -> ReLU op is switched
    off so that every convolution is a Conv2d or ConvTranspose2d node)."""
    from nfed.core.autograd import op_timer  # noqa: PLC0415
    from nfed.core.functions import conv, fused  # noqa: PLC0415
    from nfed.model import wnet  # noqa: PLC0415

    calls = []

    def record(phase, function, seconds):
        if phase == "forward" and isinstance(function, (conv.Conv2d, conv.ConvTranspose2d)):
            kind = "conv" if isinstance(function, conv.Conv2d) else "deconv"
            calls.append((kind, tuple(function.x_shape), tuple(function.w_shape), function.stride, function.padding))

    model = wnet.WNetCD(width=width, classes=classes, lambda_rec=lambda_rec, rng=np.random.default_rng(0))
    pair = np.zeros((1, 3, PROBE_TILE, PROBE_TILE), dtype=np.float32)
    fused.ENABLED, enabled = False, fused.ENABLED  # every convolution through conv2d_forward
    try:
        with op_timer(record):  # with a graph: the nodes keep the shapes they were called with
            model(pair, pair)
    finally:
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
        from nfed.gpu import conv as gpu_conv  # noqa: PLC0415

        return gpu_conv
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
    from nfed.gpu import conv as gpu_conv  # noqa: PLC0415

    if layer["kind"] == "deconv":
        return "gemm+col2im"
    k = layer["kernel"]
    return gpu_conv.conv2d_forward_path(layer["c_in"], k, k, layer["stride"], layer["padding"], np.float32)


def _measure_nfed_layer(layer, device, repeat, warmup) -> dict:
    sync = lambda: backend.synchronize(device)  # noqa: E731
    result = {"forward_path": _forward_path(layer, device)}
    with on_device(device):
        forward, backward, arrays = _nfed_layer_calls(layer, device)
        t_fwd = median_seconds(forward, sync, repeat, warmup)
        t_bwd = median_seconds(backward, sync, repeat, warmup)
        if result["forward_path"] in ("direct", "winograd"):  # the GEMM alternative: which wins per shape
            from nfed.gpu import conv as gpu_conv  # noqa: PLC0415

            saved = os.environ.get(gpu_conv.ENV_CONV_ALGORITHM)
            os.environ[gpu_conv.ENV_CONV_ALGORITHM] = "im2col"
            try:
                result["forward_s_im2col_gemm"] = median_seconds(forward, sync, repeat, warmup)
                result["backward_s_im2col_gemm"] = median_seconds(backward, sync, repeat, warmup)
            finally:
                if saved is None:
                    del os.environ[gpu_conv.ENV_CONV_ALGORITHM]
                else:
                    os.environ[gpu_conv.ENV_CONV_ALGORITHM] = saved
        del forward, backward, arrays
        peak = None
        if device.is_gpu:
            cp = backend.cupy_module()
            cp.get_default_memory_pool().free_all_blocks()
            with PeakMemory() as tracker:
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
    tdev = torch_setup(torch, device, precision)
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
    x = weight = bias = y = gy = None   # freed now (not `del`: the closures above read them)
    if device.is_gpu:
        torch.cuda.empty_cache()
    return {"forward_s": t_fwd, "backward_s": t_bwd, "peak_bytes": peak}


def run_kernels_bench(device: backend.Device, precision: str, width: int, tile: int, batch: int,
                      repeat: int, warmup: int, reference: bool) -> dict:
    """Per-layer timings of nfed (and cuDNN/PyTorch when available) on one device."""
    if not device.is_gpu and precision != "fp32":
        raise ConfigError(f"--precision {precision} needs a GPU; the CPU path computes in fp32")
    layers = wnet_layer_shapes(width, tile, batch)
    torch = import_torch() if reference else None
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
        "reference": None if torch is None else (f"torch {torch.__version__}"
                                                 + (f", cuDNN {torch.backends.cudnn.version()}" if device.is_gpu
                                                    else "")),
        "reference_note": reference_note,
        "layers": rows,
        "geomean_ratio": geomean(r.get("ratio") for r in rows),
        "geomean_ratio_forward": geomean(r.get("ratio_forward") for r in rows),
        "geomean_ratio_backward": geomean(r.get("ratio_backward") for r in rows),
    }


