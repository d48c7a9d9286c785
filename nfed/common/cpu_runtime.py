"""Process settings for the CPU compute path, made once when nfed is imported.

OpenBLAS core type. The OpenBLAS in the NumPy/SciPy wheels (0.3.31) runs its Haswell (AVX2) kernels on AMD
Zen 4/5 although those execute AVX-512; its SkylakeX kernels about double large sgemm throughput there
(126 -> 245 GFLOP/s per core on a Zen 5 EPYC), and the CPU convolutions spend most of a step in sgemm.
OpenBLAS reads the choice once, when it loads, so this runs from nfed/__init__ and does nothing when NumPy is
already imported or OPENBLAS_CORETYPE is set (a user's choice always wins). Intel processors are left to
OpenBLAS's own detection.

Freed memory stays in the heap. A training step allocates and frees hundreds of megabytes in blocks of a few
megabytes (patch matrices, padded copies, activations); glibc hands every block above 128 KiB back to the
kernel when freed, so each new one costs page faults (about 5000 a step at w8/64/8, 6-9 % of its CPU time
spent in the kernel). Raising glibc's mmap and trim thresholds keeps those pages for reuse; peak memory is
unchanged (it is set by what is alive at once). Not glibc (or NFED_KEEP_FREED_MEMORY=0): nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "OPENBLAS_CORETYPE"
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})  # what SkylakeX kernels use


def cpu_description(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    """(vendor id, feature flags) of the first processor listed, ("", {}) when unknown."""
    vendor, flags = "", frozenset()
    try:
        with open(path) as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def openblas_core(vendor: str, flags: frozenset) -> str | None:
    """The OPENBLAS_CORETYPE nfed asks for on this processor, or None to keep OpenBLAS's choice."""
    if vendor == "AuthenticAMD" and AVX512_FLAGS <= flags:
        return "SkylakeX"
    return None


def choose_openblas_core() -> None:
    if ENV in os.environ or "numpy" in sys.modules:
        return
    core = openblas_core(*cpu_description())
    if core is not None:
        os.environ[ENV] = core


KEEP_MEMORY_ENV = "NFED_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds (True when done)."""
    if os.environ.get(KEEP_MEMORY_ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
