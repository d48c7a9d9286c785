"""The one module of nfed.common that knows about CuPy: device choice, array module, transfers, kernel loading.

Everything else in nfed is array-agnostic: it asks `array_module(x)` (numpy or cupy) and calls the
same functions on either; the ops of nfed.core ask `is_gpu_array(x)` at call time and then hand the
arrays to their nfed.gpu implementation. CuPy is imported on first need (a device asked for, an array
moved to a GPU), never by importing nfed, so a CPU run never loads it nor touches CUDA. CUDA kernels from
kernels/*.cu are compiled once per process and device.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from nfed.common.errors import DeviceError

ENV_DEVICE = "NFED_DEVICE"

_NOT_LOADED = object()
_cupy = _NOT_LOADED  # the cupy module once imported, None when it cannot be


class Unsupported(Exception):
    """A GPU implementation cannot handle these arguments: the op then runs its array-agnostic code."""


def _load_cupy():
    """The cupy module, imported on the first call (None when CuPy is absent or broken: no GPU support)."""
    global _cupy
    if _cupy is _NOT_LOADED:
        try:  # CuPy is optional (extra `gpu`); import failures of any kind mean "no GPU support".
            import cupy  # type: ignore  # noqa: PLC0415
        except Exception:  # pragma: no cover - depends on the machine
            cupy = None
        _cupy = cupy
    return _cupy


def _cupy_if_loaded():
    """The cupy module if anything imported it yet, else None: no CuPy array can exist before that, so the
    array-type checks below never import it."""
    if _cupy is _NOT_LOADED:
        return _load_cupy() if "cupy" in sys.modules else None
    return _cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (imports CuPy and initialises CUDA)."""
    cupy = _load_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def gpu_count() -> int:
    return _cupy.cuda.runtime.getDeviceCount() if cupy_available() else 0


@dataclass(frozen=True)
class Device:
    """A compute device: `cpu` or `cuda:N`."""

    kind: str
    index: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def xp(self) -> ModuleType:
        """The array module (numpy or cupy) that allocates on this device."""
        return _load_cupy() if self.is_gpu else np

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_gpu else "cpu"

    def use(self) -> None:
        """Make this the current CUDA device of the calling thread (no-op on CPU)."""
        if self.is_gpu:
            _load_cupy().cuda.Device(self.index).use()

    def __enter__(self):
        """`with device:` makes it current for the block, then restores the previous device."""
        if self.is_gpu:
            runtime = _load_cupy().cuda.runtime
            _previous_devices().append(runtime.getDevice())
            runtime.setDevice(self.index)
        return self

    def __exit__(self, *exc):
        if self.is_gpu:
            _load_cupy().cuda.runtime.setDevice(_previous_devices().pop())
        return False


CPU = Device("cpu")
_thread_state = threading.local()


def _previous_devices() -> list[int]:
    """Per-thread stack of the CUDA devices that `with device:` blocks replaced."""
    if not hasattr(_thread_state, "stack"):
        _thread_state.stack = []
    return _thread_state.stack


def parse_device(spec: str | Device | None) -> Device:
    """Parse 'cpu', 'cuda' or 'cuda:N' (None: $NFED_DEVICE, else cpu) and check the device is usable."""
    if isinstance(spec, Device):
        return spec
    if spec is None or spec == "":
        spec = os.environ.get(ENV_DEVICE, "cpu") or "cpu"
    text = str(spec).strip().lower()
    if text == "cpu":
        return CPU
    if text == "gpu":
        text = "cuda"
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise DeviceError(f"bad device '{spec}': use cpu, cuda or cuda:N")
        index = int(index_text)
        if _load_cupy() is None:
            raise DeviceError(f"device '{spec}' needs CuPy, which is not installed "
                              "(pip install 'nfed[gpu]' or cupy-cuda13x), or use --device cpu")
        count = gpu_count()
        if count == 0:
            raise DeviceError(f"device '{spec}' asked for, but no CUDA GPU is visible on this machine")
        if index >= count:
            raise DeviceError(f"device '{spec}' asked for, but only {count} GPU(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
        return Device("cuda", index)
    raise DeviceError(f"bad device '{spec}': use cpu, cuda or cuda:N")


def array_module(*arrays) -> ModuleType:
    """numpy or cupy, whichever owns the given arrays (numpy when none is a CuPy array)."""
    cupy = _cupy_if_loaded()
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def is_gpu_array(a) -> bool:
    """True for a CuPy array (never imports CuPy: without it loaded there is none)."""
    cupy = _cupy_if_loaded()
    return cupy is not None and isinstance(a, cupy.ndarray)


def device_of(a) -> Device:
    if is_gpu_array(a):
        return Device("cuda", a.device.id)
    return CPU


def to_numpy(a) -> np.ndarray:
    """Copy to host memory (no copy when already NumPy)."""
    if is_gpu_array(a):
        return _load_cupy().asnumpy(a)
    return np.asarray(a)


def to_device(a, device: Device | str | None):
    """Move an array to a device (no copy when it is already there)."""
    device = parse_device(device) if not isinstance(device, Device) else device
    if not device.is_gpu:
        return to_numpy(a)
    if is_gpu_array(a) and a.device.id == device.index:
        return a
    cupy = _load_cupy()
    with cupy.cuda.Device(device.index):
        return cupy.asarray(a)


def synchronize(device: Device | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU); needed before timing GPU code."""
    if device is not None and device.is_gpu:
        cupy = _load_cupy()
        with cupy.cuda.Device(device.index):
            cupy.cuda.Device().synchronize()


def cupy_module() -> ModuleType:
    """The cupy module itself, for GPU-only code paths (raises a clear error without CuPy)."""
    if _load_cupy() is None:
        raise DeviceError("CuPy is not installed: GPU code paths are unavailable")
    return _load_cupy()


@functools.lru_cache(maxsize=None)
def _raw_module(source_name: str, device_index: int, options: tuple[str, ...]):
    from nfed.common.resources import kernel_source

    cupy = _load_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(source_name), options=options)
        module.compile()
    return module


def load_kernel(source_name: str, function_name: str, device: Device | None = None,
                options: tuple[str, ...] = ("-std=c++17",)):
    """A compiled kernel from kernels/<source_name>; compiled once per process and device (memoised)."""
    cupy_module()
    index = device.index if device is not None and device.is_gpu else _load_cupy().cuda.Device().id
    return _raw_module(source_name, index, tuple(options)).get_function(function_name)
