"""The CUDA kernels of kernels/*.cu as Python calls: their argument table, the compile cache, checked launches
and grid sizes, shared by every op module of nfed.gpu.

Kernels are compiled once per process and device (nfed.common.backend.load_kernel) on their first launch.
Every launch goes through `launch`, which converts the arguments to the C types declared in KERNELS (tests
check that table against the compiled PTX), so a wrong argument type cannot silently corrupt a launch.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from nfed.common import backend

# kernel name -> (source file, argument kinds): p = device array, i = int32, l = int64, f = float32,
# d = float64. Suffix _f32/_f64 selects the dtype; the table lists both.
_ARG_KINDS = {
    "im2col.cu": {
        "im2col_NCHW_{t}": "pp" + "i" * 10,
        "im2col_NCHW_f32_to_bf16": "pp" + "i" * 10,
        "col2im_NCHW_{t}": "pp" + "i" * 10,
        "float_to_bf16": "ppl",
    },
    "batchnorm.cu": {
        "bn_partial_sums_NCHW_{t}": "piiip",
        "bn_finalize_stats_{t}": "ppiiilddippppp",
        "bn_forward_apply_NCHW_{t}": "ppppppp" + "iiii",
        "bn_backward_partial_sums_NCHW_{t}": "pppppp" + "iiiiip",
        "bn_backward_apply_NCHW_{t}": "ppppppp" + "iiiiiip",
        "channel_partial_sums_NCHW_{t}": "piiip",
    },
    "pooling.cu": {
        "max_pool2d_forward_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_gather_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_scatter_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
    },
    "softmax_ce.cu": {
        "softmax_NKHW_{t}": "pplili",
        "softmax_backward_NKHW_{t}": "ppplili",
        "softmax_cross_entropy_forward_NKHW_{t}": "pppllilpp",
        "softmax_cross_entropy_backward_NKHW_{t}": "ppplpililp",
    },
    "adam.cu": {
        "adam_update_{t}": "ppppl" + "dddddd" + "d" + "i",
        "sgd_update_{t}": "pppl" + "dddd" + "ii",
    },
    "conv_direct.cu": {
        "conv2d_direct_NCHW_{t}": "pppp" + "i" * 11,
    },
    "winograd.cu": {
        "winograd_filter_transform_{t}": "ppii",
        "winograd_input_transform_NCHW_{t}": "pp" + "i" * 7,
        "winograd_output_transform_NCHW_{t}": "ppp" + "i" * 6,
        "winograd_grad_transform_NCHW_{t}": "pp" + "i" * 6,
        "winograd_weight_output_transform_{t}": "ppii",
    },
    "fedavg.cu": {
        "weighted_accumulate_f64": "ppdl",
        "weighted_accumulate_f32_to_f64": "ppdl",
    },
    "elementwise.cu": {
        "add_channel_bias_NCHW_{t}": "pplii",
    },
}


def _expand_kernels() -> dict[str, tuple[str, str]]:
    table = {}
    for source, kernels in _ARG_KINDS.items():
        for name, kinds in kernels.items():
            for t in (("f32", "f64") if "{t}" in name else ("",)):
                for i in (("u8", "i32") if "{i}" in name else ("",)):
                    table[name.format(t=t, i=i)] = (source, kinds)
    return table


KERNELS: dict[str, tuple[str, str]] = _expand_kernels()

BLOCK = 256
_MAX_GRID_Y = 65535
_SCALAR_TYPES = {"i": np.int32, "l": np.int64, "f": np.float32, "d": np.float64}


def dtype_suffix(dtype) -> str:
    """The kernel-name suffix of a dtype: f32 or f64 (other dtypes are left to the array-agnostic code)."""
    if dtype == np.float32:
        return "f32"
    if dtype == np.float64:
        return "f64"
    raise backend.Unsupported(f"GPU ops support float32 and float64 arrays, got {dtype}")


@functools.lru_cache(maxsize=None)
def compiled_kernel(name: str, device_index: int):
    """Kernel `name` compiled for one device (the first call compiles its source file)."""
    source, _ = KERNELS[name]
    return backend.load_kernel(source, name, backend.Device("cuda", device_index))


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    cp = backend.cupy_module()
    return int(cp.cuda.runtime.getDeviceProperties(device_index)["multiProcessorCount"])


def launch(name: str, grid, args, device_index: int, block: int = BLOCK) -> None:
    """Launch kernel `name` with arguments converted to the C types its KERNELS entry declares."""
    cp = backend.cupy_module()
    kinds = KERNELS[name][1]
    if len(args) != len(kinds):
        raise TypeError(f"kernel {name} takes {len(kinds)} arguments, got {len(args)}")
    converted = []
    for kind, value in zip(kinds, args):
        if kind == "p" and value is None:
            converted.append(np.uint64(0))  # a null pointer (8 bytes, like any device pointer)
        elif kind == "p":
            if not isinstance(value, cp.ndarray):
                raise TypeError(f"kernel {name}: expected a device array, got {type(value).__name__}")
            if not value.flags.c_contiguous:
                raise ValueError(f"kernel {name}: arrays must be C-contiguous")
            converted.append(value)
        else:
            converted.append(_SCALAR_TYPES[kind](value))
    grid = tuple(max(1, int(g)) for g in (grid if isinstance(grid, tuple) else (grid,)))
    with cp.cuda.Device(device_index):
        compiled_kernel(name, device_index)(grid, (block,), tuple(converted))


def grid_1d(n: int, device_index: int) -> int:
    """Blocks for a grid-stride loop over n elements: enough to fill the device, no more."""
    return max(1, min(math.ceil(n / BLOCK), multiprocessors(device_index) * 16))


def grid_planes(planes: int, pixels: int) -> tuple[int, int]:
    """x over the pixels of a plane, y over planes (grid-stride in both)."""
    return max(1, math.ceil(pixels / BLOCK)), max(1, min(planes, _MAX_GRID_Y))


def channel_splits(elements_per_channel: int, channels: int, device_index: int) -> int:
    """Blocks per channel for the per-channel reductions: fill the GPU, keep >= 2048 elements a block."""
    wanted = max(1, (multiprocessors(device_index) * 8) // max(1, channels))
    return max(1, min(wanted, math.ceil(elements_per_channel / (BLOCK * 8)), 1024))


def device_index(a) -> int:
    return a.device.id


def contiguous(a):
    cp = backend.cupy_module()
    return a if a.flags.c_contiguous else cp.ascontiguousarray(a)


def pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)
