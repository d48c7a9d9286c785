"""Max pooling on CuPy arrays (kernels/pooling.cu), with the signatures and index format of
nfed.core.functions.pooling: square windows and equal strides, else backend.Unsupported."""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels


def _square_pool(kernel_size, stride) -> tuple[int, int]:
    kh, kw = kernels.pair(kernel_size)
    sh, sw = kernels.pair(kernel_size if stride is None else stride)
    if kh != kw or sh != sw:
        raise backend.Unsupported("GPU max_pool2d supports square windows and equal strides")
    return kh, sh


def _pool_index_suffix(k: int) -> tuple[str, type]:
    return ("u8", np.uint8) if k * k <= 256 else ("i32", np.int32)


def max_pool2d_forward(x, kernel_size=2, stride=None):
    """-> (y [N, C, HO, WO], index [N, C, HO, WO]): window position i*k + j of each maximum (uint8 when
    k*k <= 256, else int32), the CPU function's format; no padding, floor sizes, first maximum wins."""
    cp = backend.cupy_module()
    x = kernels.contiguous(x)
    k, s = _square_pool(kernel_size, stride)
    n, c, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"max_pool2d: window {k}x{k} larger than input {h}x{w}")
    index_suffix, index_dtype = _pool_index_suffix(k)
    y = cp.empty((n, c, ho, wo), dtype=x.dtype)
    index = cp.empty((n, c, ho, wo), dtype=index_dtype)
    kernels.launch(f"max_pool2d_forward_NCHW_{kernels.dtype_suffix(x.dtype)}_{index_suffix}",
                   kernels.grid_planes(n * c, ho * wo),
                   (x, y, index, n * c, h, w, k, s, ho, wo), kernels.device_index(x))
    return y, index


def max_pool2d_backward(grad_output, index, x_shape, kernel_size=2, stride=None):
    """Gradient of max_pool2d: each output gradient goes to its window's maximum."""
    cp = backend.cupy_module()
    gy = kernels.contiguous(grad_output)
    k, s = _square_pool(kernel_size, stride)
    index_suffix, index_dtype = _pool_index_suffix(k)
    index = kernels.contiguous(index.astype(index_dtype, copy=False))
    n, c, h, w = (int(v) for v in x_shape)
    ho, wo = gy.shape[2], gy.shape[3]
    name = f"{kernels.dtype_suffix(gy.dtype)}_{index_suffix}"
    if k <= s:  # windows do not overlap: a gather writes every input gradient exactly once
        gx = cp.empty((n, c, h, w), dtype=gy.dtype)
        kernels.launch(f"max_pool2d_backward_gather_NCHW_{name}", kernels.grid_planes(n * c, h * w),
                       (gy, index, gx, n * c, h, w, k, s, ho, wo), kernels.device_index(gy))
    else:
        gx = cp.zeros((n, c, h, w), dtype=gy.dtype)
        kernels.launch(f"max_pool2d_backward_scatter_NCHW_{name}", kernels.grid_planes(n * c, ho * wo),
                       (gy, index, gx, n * c, h, w, k, s, ho, wo), kernels.device_index(gy))
    return gx


