"""Ask OpenBLAS for its AVX-512 kernels on AMD processors that have AVX-512 (before NumPy loads it).

The OpenBLAS in the NumPy/SciPy wheels (0.3.31) runs its Haswell (AVX2) kernels on AMD Zen 4/5 although those
execute AVX-512; its SkylakeX kernels about double sgemm throughput there (126 -> 245 GFLOP/s per core measured
on a Zen 5 EPYC), and the CPU convolutions spend most of a training step in sgemm. OpenBLAS reads the choice
once, when it loads, so this runs from nfed/__init__ and does nothing when NumPy is already imported or the
user set OPENBLAS_CORETYPE (which always wins). Intel processors are left to OpenBLAS's own detection.
"""
from __future__ import annotations

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
