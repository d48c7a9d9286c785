"""What the GPU benchmark engines share: the devices to run on, timing with synchronisation, CuPy peak memory
and the optional PyTorch reference (torch is imported only here and only when present).

The engines: nfed.benchmarks.gpu_kernels (`nfed bench kernels`) and nfed.benchmarks.gpu_aggregate
(`nfed bench aggregate`); nfed.commands.bench_gpu parses their options and prints their results.
GPU-only code reaches CuPy through nfed.common.backend.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

from nfed.common import backend


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


class PeakMemory:
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


def import_torch():
    try:
        import torch  # noqa: PLC0415 - optional reference, bench only
    except Exception:
        return None
    return torch


def torch_setup(torch, device: backend.Device, precision: str):
    """torch.device for `device`, with cuDNN/cuBLAS precision set to match nfed's mode."""
    if device.is_gpu:
        allow = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = allow  # PyTorch's default is True: fp32 must switch it off
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.benchmark = True  # cuDNN's best algorithm per shape (tuned during warm-up)
        return torch.device("cuda", device.index)
    return torch.device("cpu")


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


