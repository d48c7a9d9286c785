"""Precision modes of the GPU GEMMs (fp32 | tf32 | bf16); nfed.gpu.gemm's cuBLAS GEMM honours them.

Every convolution of nfed ends in a GEMM; this module decides how that GEMM multiplies:

- ``fp32`` (default): float32 inputs, float32 multiply-accumulate (CUBLAS_COMPUTE_32F). Matches the CPU
  path up to summation order: max |gpu - cpu| / max |cpu| below ``TOLERANCES["fp32"]`` per op.
- ``tf32``: float32 storage, tensor-core products with inputs rounded to TF32 (10-bit mantissa) and float32
  accumulation (CUBLAS_COMPUTE_32F_FAST_TF32). Relative GEMM error ~1e-3.
- ``bf16``: GEMM inputs rounded to bfloat16 (8-bit mantissa) by nfed's own packing kernels, float32
  accumulation and float32 outputs; master weights, optimiser state, batch norm, losses and the update stay
  float32 (what PyTorch's bf16 autocast does for convolutions). Relative GEMM error ~1e-2.

float64 arrays always multiply in float64 (the mode only concerns float32 data). The mode is process-wide
(set from ``--precision`` or ``$NFED_PRECISION``) and can be changed for a block with ``precision(mode)``.
"""
from __future__ import annotations

import contextlib
import os

from nfed.common.errors import ConfigError

MODES = ("fp32", "tf32", "bf16")
ENV_PRECISION = "NFED_PRECISION"

# Normalised error bound per op against the float64/float32 CPU reference:
# max |gpu - reference| / max(|reference|, tiny). Used by tests and quoted in the README.
TOLERANCES = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2}

_mode: str | None = None


def parse_precision(text: str | None) -> str:
    """Validate a precision name (None or '' -> $NFED_PRECISION, else fp32)."""
    if text is None or text == "":
        text = os.environ.get(ENV_PRECISION, "fp32") or "fp32"
    mode = str(text).strip().lower()
    if mode not in MODES:
        raise ConfigError(f"bad precision '{text}': use one of {', '.join(MODES)}")
    return mode


def get_precision() -> str:
    """The precision mode in force (first call reads $NFED_PRECISION)."""
    global _mode
    if _mode is None:
        _mode = parse_precision(None)
    return _mode


def set_precision(mode: str | None) -> str:
    """Set the process-wide precision mode; returns the previous one."""
    global _mode
    previous = get_precision()
    _mode = parse_precision(mode)
    return previous


@contextlib.contextmanager
def precision(mode: str | None):
    """Run a block under another precision mode."""
    previous = set_precision(mode)
    try:
        yield
    finally:
        set_precision(previous)
