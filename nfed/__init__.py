"""nfed: federated building-change detection, written from scratch on NumPy (CPU) and CuPy (GPU)."""

__version__ = "0.1.0"

from nfed.common import cpu_runtime as _cpu_runtime

_cpu_runtime.choose_openblas_core()
_cpu_runtime.keep_freed_memory()
