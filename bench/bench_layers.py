"""Layer by layer: every conv 3x3 -> batch norm -> ReLU unit of W-Net-CD in nfed and in PyTorch, same shapes, same
thread count, measured in the same run.

`nfed bench step` gives one ratio for a whole step; this splits it over the 36 units that take about 80 % of a
step, so the layers that lose it (and how far each one is from the machine's matrix-product speed) are visible.
For each unit: the training forward (batch statistics), the backward (input, weight, scale and shift gradients)
and the evaluation forward (running statistics, no graph). The shapes are read from a forward pass of nfed's own
model (no second copy of the architecture here). PyTorch runs the unit as Conv2d + BatchNorm2d + ReLU on NCHW
tensors, as the twin of `nfed bench step` does, and also on channels-last tensors (the layout nfed's activations
have), reported in the totals. nfed's inputs are channels-last, as inside the model. Each time is the best of
--repeat calls. "GF/s" is the unit's convolution arithmetic (2 * N * H * W * C * O * 9 per pass) over nfed's
time; "sgemm" is one large float32 matrix product on this machine's BLAS on one thread times the threads, the speed
the patch-matrix convolutions would reach with no copies and no overhead.

    python bench/bench_layers.py [--width 8] [--tile 64] [--batch 8] [--repeat 7] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def unit_shapes(width: int, tile: int, batch: int) -> list[dict]:
    """[{name, x_shape, w_shape}] of every conv-BN-ReLU unit in forward order, from one evaluation forward."""
    from nfed.core.autograd import no_grad
    from nfed.model import wnet

    model = wnet.WNetCD(width, 2, 0.1, rng=np.random.default_rng(0))
    names = {id(p.data): name.rsplit(".", 1)[0] for name, p in model.named_parameters()}
    seen = []
    original = wnet.F.conv_bn_relu

    def recording(x, weight, *args, **kwargs):
        seen.append({"name": names[id(getattr(weight, "data", weight))], "x_shape": tuple(x.shape),
                     "w_shape": tuple(weight.shape)})
        return original(x, weight, *args, **kwargs)

    wnet.F.conv_bn_relu = recording
    try:
        model.eval()
        with no_grad():
            images = np.zeros((batch, 3, tile, tile), dtype=np.float32)
            model.forward(images, images)
    finally:
        wnet.F.conv_bn_relu = original
    return seen


def best_of(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def nfed_times(x, w, g, repeat: int) -> tuple[float, float, float]:
    from nfed.core import functions as F
    from nfed.core.autograd import Tensor, no_grad

    o = w.shape[0]
    gamma, beta = np.ones(o, np.float32), np.zeros(o, np.float32)
    running_mean, running_var = np.zeros(o, np.float32), np.ones(o, np.float32)
    inputs = [Tensor(a, requires_grad=True) for a in (x, w, gamma, beta)]

    def forward():
        return F.conv_bn_relu(inputs[0], inputs[1], None, inputs[2], inputs[3], running_mean, running_var, True)

    def evaluation():
        with no_grad():
            F.conv_bn_relu(x, w, None, gamma, beta, running_mean, running_var, False)

    upstream = Tensor(g)
    forward_s = best_of(forward, repeat)
    both_s = best_of(lambda: forward().backward(upstream), repeat)
    return forward_s, max(0.0, both_s - forward_s), best_of(evaluation, repeat)


def torch_times(x, w, g, repeat: int, channels_last: bool) -> tuple[float, float, float]:
    import torch

    layout = torch.channels_last if channels_last else torch.contiguous_format
    o, c = w.shape[:2]
    conv = torch.nn.Conv2d(c, o, 3, padding=1, bias=False).to(memory_format=layout)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    norm = torch.nn.BatchNorm2d(o)
    tx = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=layout).requires_grad_(True)
    tg = torch.from_numpy(np.ascontiguousarray(g)).contiguous(memory_format=layout)

    def forward():
        return torch.relu(norm(conv(tx)))

    def evaluation():
        with torch.no_grad():
            torch.relu(norm(conv(tx)))

    norm.train()
    forward_s = best_of(forward, repeat)
    both_s = best_of(lambda: forward().backward(tg), repeat)
    norm.eval()
    evaluation_s = best_of(evaluation, repeat)
    return forward_s, max(0.0, both_s - forward_s), evaluation_s


def sgemm_speed(repeat: int) -> float:
    """GFLOP/s of a 4096 x 1152 x 128 float32 product on one thread, times the threads (nfed's convolutions run
    single-threaded BLAS calls on every thread at once)."""
    from nfed.core.functions.parallel import num_workers, single_threaded_blas

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 1152), dtype=np.float32)
    b = rng.standard_normal((1152, 128), dtype=np.float32)
    out = np.empty((4096, 128), np.float32)
    with single_threaded_blas():
        seconds = best_of(lambda: np.matmul(a, b, out=out), repeat)
    return 2 * 4096 * 1152 * 128 / seconds / 1e9 * num_workers()


def measure(width: int, tile: int, batch: int, repeat: int) -> dict:
    import torch

    from nfed.core.functions.layout import to_channels_last
    from nfed.core.functions.parallel import blas_kernels, num_workers

    rng = np.random.default_rng(0)
    rows = []
    for unit in unit_shapes(width, tile, batch):
        n, c, h, wd = unit["x_shape"]
        o = unit["w_shape"][0]
        x = to_channels_last(rng.standard_normal((n, c, h, wd), dtype=np.float32))
        w = (rng.standard_normal((o, c, 3, 3), dtype=np.float32) / np.float32(np.sqrt(9 * c)))
        g = to_channels_last(rng.standard_normal((n, o, h, wd), dtype=np.float32))
        nfed = nfed_times(x, w, g, repeat)
        nchw = torch_times(x, w, g, repeat, channels_last=False)
        channels_last = torch_times(x, w, g, repeat, channels_last=True)
        rows.append({**unit, "gflop": 2 * n * h * wd * c * o * 9 / 1e9, "nfed_ms": [1e3 * s for s in nfed],
                     "torch_nchw_ms": [1e3 * s for s in nchw],
                     "torch_channels_last_ms": [1e3 * s for s in channels_last]})
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"width": width, "tile": tile, "batch": batch, "repeat": repeat, "threads": num_workers(),
            "torch_threads": torch.get_num_threads(), "blas": blas_kernels(), "torch": torch.__version__,
            "sgemm_gflops": sgemm_speed(repeat), "passes": ["forward", "backward", "eval"], "units": rows}


def report(result: dict) -> list[str]:
    lines = [f"W-Net-CD conv-BN-ReLU units, w {result['width']}, tile {result['tile']}, batch {result['batch']}, "
             f"{result['threads']} threads each ({result['blas']}; torch {result['torch']}); "
             f"sgemm {result['sgemm_gflops']:.0f} GF/s",
             "ms per call: nfed / PyTorch NCHW (ratio = PyTorch time / nfed time, >= 1 means nfed is as fast)",
             f"{'unit':24s} {'x shape':>18s} {'O':>4s}  {'forward':>19s}  {'backward':>19s}  {'eval':>19s}  "
             f"{'GF/s fwd':>8s}"]
    totals = {key: np.zeros(3) for key in ("nfed_ms", "torch_nchw_ms", "torch_channels_last_ms")}
    for unit in result["units"]:
        nfed, ref = unit["nfed_ms"], unit["torch_nchw_ms"]
        cells = [f"{a:6.2f}/{b:6.2f} {_ratio(b, a):>4s}" for a, b in zip(nfed, ref)]
        lines.append(f"{unit['name']:24s} {str(unit['x_shape']):>18s} {unit['w_shape'][0]:4d}  " + "  ".join(cells)
                     + f"  {_ratio(unit['gflop'] * 1e3, nfed[0], '.0f'):>8s}")
        for key in totals:
            totals[key] += unit[key]
    nfed = totals["nfed_ms"]
    for label, key in (("PyTorch NCHW", "torch_nchw_ms"), ("PyTorch channels-last", "torch_channels_last_ms")):
        ref = totals[key]
        lines.append(f"total vs {label:22s} " + "  ".join(
            f"{name} {mine:7.1f}/{theirs:7.1f} ms {_ratio(theirs, mine)}x"
            for name, mine, theirs in zip(("forward", "backward", "eval"), nfed, ref)))
    gflop = sum(unit["gflop"] for unit in result["units"])
    lines.append(f"forward arithmetic {gflop:.2f} GFLOP: {gflop / result['sgemm_gflops'] * 1e3:.1f} ms at the sgemm "
                 "speed")
    return lines


def _ratio(numerator: float, denominator: float, spec: str = ".2f") -> str:
    """numerator / denominator formatted, "-" when the denominator is 0 (a backward too short to tell apart)."""
    return format(numerator / denominator, spec) if denominator > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7, help="calls per measurement (best kept)")
    parser.add_argument("--threads", type=int, help="threads for both sides (default: all usable CPUs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    if args.width < 1 or args.batch < 1 or args.repeat < 1 or args.tile < 16 or args.tile % 16:
        parser.error("--width, --batch, --repeat must be >= 1 and --tile a positive multiple of 16")
    try:
        import torch
    except ImportError:
        parser.error("PyTorch is the reference here: pip install 'nfed[bench]'")
    if args.threads:
        os.environ["NFED_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    result = measure(args.width, args.tile, args.batch, args.repeat)
    print(json.dumps(result, indent=1) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
