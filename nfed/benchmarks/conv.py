"""Convolution benchmark: nfed's CPU conv2d against PyTorch CPU, measured in the same run.

For each shape (N, C, K, HW) -- N images of C channels, HW x HW pixels, K output channels, 3x3 kernel,
padding 1, float32 -- it times the forward pass and the backward pass (input and weight gradients) of
both implementations, interleaved so both see the same machine load, and keeps the fastest of `repeat`
runs (the least disturbed one on a shared machine). Peak memory of one call is measured in a fresh
subprocess per (implementation, shape, pass) as the rise of the peak resident set size above its level
once the inputs exist (Linux: the peak mark is reset through /proc/self/clear_refs just before the call).
PyTorch is only a reference here; nfed itself never imports it.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

from nfed.core.functions.parallel import ENV_THREADS, num_workers

SHAPES = ((8, 16, 16, 64), (8, 64, 64, 64), (8, 32, 32, 128))
PASSES = ("forward", "backward")


def _inputs(shape, seed: int = 0):
    n, c, k, hw = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, hw, hw), dtype=np.float32)
    w = (rng.standard_normal((k, c, 3, 3), dtype=np.float32) / np.float32(math.sqrt(9 * c)))
    b = rng.standard_normal(k, dtype=np.float32)
    g = rng.standard_normal((n, k, hw, hw), dtype=np.float32)
    return x, w, b, g


def _nfed_calls(x, w, b, g):
    from nfed.core.functions import conv

    def forward():
        return conv.conv2d_forward(x, w, b, 1, 1)

    def backward():
        return (conv.conv2d_backward_input(g, w, x.shape, 1, 1),
                conv.conv2d_backward_weight(x, g, w.shape, 1, 1))

    return {"forward": forward, "backward": backward}


def _torch_calls(x, w, b, g):
    import torch

    tx, tw, tb, tg = (torch.from_numpy(a) for a in (x, w, b, g))

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, 1, 1)

    def backward():  # the same work: input and weight gradients of a 3x3/pad-1 convolution
        return torch.ops.aten.convolution_backward(tg, tx, tw, [tw.shape[0]], [1, 1], [1, 1], [1, 1], False,
                                                   [0, 0], 1, [True, True, False])

    return {"forward": forward, "backward": backward}


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def measure_peak(impl: str, shape, which: str) -> int:
    """Extra peak resident memory (bytes) of one call above the level once its inputs exist.

    Run in a fresh process with MALLOC_MMAP_THRESHOLD_ small, so every large buffer is fresh memory
    (not recycled heap) and shows up in the resident set of both implementations alike."""
    arrays = _inputs(shape)
    calls = (_nfed_calls if impl == "nfed" else _torch_calls)(*arrays)
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        result = calls[which]()
        after = _status_kib("VmHWM")
    else:  # peak since process start: may hide peaks below the import-time mark
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = calls[which]()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    return max(0, after - before) * 1024


def _peak_in_subprocess(impl: str, shape, which: str, threads: int | None) -> int | None:
    code = ("import sys, json; from nfed.benchmarks.conv import measure_peak; "
            f"print(json.dumps(measure_peak({impl!r}, {tuple(shape)!r}, {which!r})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if threads:
        env.update({ENV_THREADS: str(threads), "OMP_NUM_THREADS": str(threads)})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def _elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def progress_steps(repeat: int, shapes=SHAPES) -> int:
    """How many times run_conv_bench calls its progress callback."""
    return len(shapes) * len(PASSES) * repeat


def run_conv_bench(shapes=SHAPES, repeat: int = 5, memory: bool = True, threads: int | None = None,
                   progress=None) -> dict:
    """Time (and optionally peak memory) of nfed vs PyTorch conv2d; returns a JSON-able dict.

    threads: run both sides with this many threads (default: as they are, all usable CPUs)."""
    have_torch = torch_version() is not None
    if threads:
        os.environ[ENV_THREADS] = str(threads)
        if have_torch:
            import torch
            torch.set_num_threads(threads)
    rows = []
    for shape in shapes:
        arrays = _inputs(shape)
        impls = {"nfed": _nfed_calls(*arrays)}
        if have_torch:
            impls["torch"] = _torch_calls(*arrays)
        for which in PASSES:
            times = {name: [] for name in impls}
            for name, calls in impls.items():  # warm-up (allocator, thread pools, oneDNN kernels)
                calls[which]()
            for _ in range(repeat):
                for name, calls in impls.items():
                    times[name].append(_elapsed(calls[which]))
                if progress:
                    progress()
            n = shape[0]
            row = {"shape": list(shape), "pass": which}
            for name in impls:
                best = min(times[name])
                row[f"{name}_ms"] = best * 1e3
                row[f"{name}_images_per_s"] = n / best
                if memory:
                    peak = _peak_in_subprocess(name, shape, which, threads)
                    row[f"{name}_peak_mb"] = None if peak is None else peak / 2 ** 20
            if have_torch:
                row["throughput_ratio"] = row["torch_ms"] / row["nfed_ms"]
                if memory and row.get("nfed_peak_mb") and row.get("torch_peak_mb"):
                    row["memory_ratio"] = row["nfed_peak_mb"] / row["torch_peak_mb"]
            rows.append(row)
    result = {"torch_version": torch_version(), "repeat": repeat, "dtype": "float32", "kernel": "3x3 pad 1",
              "threads": _thread_info(), "rows": rows, "goal": {"forward": 0.7, "backward": 0.5}}
    if have_torch:
        for which in PASSES:
            ratios = [r["throughput_ratio"] for r in rows if r["pass"] == which]
            result[f"geomean_{which}"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return result


def _thread_info() -> dict:
    info = {"nfed_workers": num_workers()}
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def format_table(result: dict) -> str:
    """The result as a plain-text table plus the geometric means."""
    have_torch = result.get("torch_version") is not None
    header = f"{'shape (N,C,K,HW)':<20}{'pass':<10}{'nfed ms':>9}{'img/s':>8}"
    if have_torch:
        header += f"{'torch ms':>10}{'img/s':>8}{'ratio':>7}"
    header += f"{'nfed MB':>9}" + (f"{'torch MB':>10}" if have_torch else "")
    lines = [header, "-" * len(header)]

    def mb(value):
        return "n/a" if value is None else f"{value:.0f}"

    for row in result["rows"]:
        line = f"{str(tuple(row['shape'])):<20}{row['pass']:<10}{row['nfed_ms']:>9.1f}{row['nfed_images_per_s']:>8.1f}"
        if have_torch:
            line += f"{row['torch_ms']:>10.1f}{row['torch_images_per_s']:>8.1f}{row['throughput_ratio']:>7.2f}"
        if "nfed_peak_mb" in row:
            line += f"{mb(row['nfed_peak_mb']):>9}" + (f"{mb(row.get('torch_peak_mb')):>10}" if have_torch else "")
        lines.append(line)
    if have_torch:
        goal = result["goal"]
        lines.append("")
        for which in PASSES:
            value = result[f"geomean_{which}"]
            verdict = "meets" if value >= goal[which] else "below"
            lines.append(f"geometric mean throughput ratio nfed/torch, {which}: {value:.2f} "
                         f"({verdict} the goal {goal[which]})")
        threads = result["threads"]
        lines.append(f"reference: PyTorch {result['torch_version']} CPU in the same run "
                     f"({threads.get('torch_threads')} threads; nfed {threads['nfed_workers']}); "
                     "ratio > 1 means nfed is faster")
    else:
        lines.append("PyTorch is not installed: nfed timings only (pip install torch for the reference)")
    return "\n".join(lines)
