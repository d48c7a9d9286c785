"""nfed: federated building-change detection, written from scratch on NumPy (CPU) and CuPy (GPU)."""

__version__ = "0.1.0"

from .cpu_blas import choose_openblas_core as _choose_openblas_core

_choose_openblas_core()
