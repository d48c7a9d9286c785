"""Max pooling (floor mode, first maximum wins on ties, like PyTorch); CuPy arrays go to nfed.gpu.pooling."""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.core.autograd import Function
from nfed.core.dispatch import gpu_implementation
from nfed.core.functions.im2col import conv_output_size
from nfed.core.functions.layout import empty_like_layout, zeros_like_layout
from nfed.core.functions.parallel import num_workers, run_blocks
from nfed.core.functions.utils import pair

# From this many input values a 2x2 pooling splits its images over the CPU worker pool (NumPy arrays).
PARALLEL_MIN_VALUES = 1 << 18


def _gpu_pooling():
    from nfed.gpu import pooling  # noqa: PLC0415 - at the first CuPy call: importing nfed loads no CuPy

    return pooling


@gpu_implementation(lambda: _gpu_pooling().max_pool2d_forward)
def max_pool2d_forward(x, kernel_size=2, stride=None):
    """(y, argmax) for x [N, C, H, W]; argmax (uint8) is the window position (i*kw + j) of each maximum.
    Outputs keep x's layout (channels-last stays channels-last)."""
    xp = backend.array_module(x)
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, sh, 0), conv_output_size(w, kw, sw, 0)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"max_pool2d: window {kh}x{kw} larger than input {h}x{w}")
    if (kh, kw) == (2, 2) and (sh, sw) == (2, 2):
        out = empty_like_layout(x, (n, c, ho, wo))
        index = empty_like_layout(x, (n, c, ho, wo), xp.uint8)
        x = x[:, :, :2 * ho, :2 * wo]
        _by_images(xp, x, lambda i: _max_2x2(xp, x[i], out[i], index[i]))
        return out, index
    s0, s1, s2, s3 = x.strides
    windows = xp.lib.stride_tricks.as_strided(x, (n, c, ho, wo, kh, kw), (s0, s1, s2 * sh, s3 * sw, s2, s3))
    windows = windows.reshape(n, c, ho, wo, kh * kw)
    index = windows.argmax(axis=-1)
    out = xp.take_along_axis(windows, index[..., None], axis=-1)[..., 0]
    return out, index.astype(xp.uint8 if kh * kw <= 256 else xp.int32)


def _windows_2x2(x):
    """The four [N, C, H/2, W/2] views of 2x2 windows in scan order (0, 0), (0, 1), (1, 0), (1, 1)."""
    return x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]


def _max_2x2(xp, x, out, index) -> None:
    a, b, c, d = _windows_2x2(x)
    top = xp.maximum(a, b)
    bottom = xp.maximum(c, d)
    xp.maximum(top, bottom, out=out)
    # First maximum in scan order a, b, c, d: a strict ">" at each step keeps the earlier one.
    right = (b > a).view(xp.uint8)
    lower_right = (d > c).view(xp.uint8)
    lower = (bottom > top).view(xp.uint8)
    index[...] = right + lower * (2 + lower_right - right)


def _by_images(xp, x, task) -> None:
    """task(image slice) over x's images: on the CPU worker pool for big NumPy arrays, else in one call."""
    n = x.shape[0]
    if xp is np and n > 1 and x.size >= PARALLEL_MIN_VALUES:
        per = -(-n // (2 * num_workers()))
        run_blocks(task, [slice(i, min(n, i + per)) for i in range(0, n, per)])
    else:
        task(slice(None))


@gpu_implementation(lambda: _gpu_pooling().max_pool2d_backward)
def max_pool2d_backward(gout, index, x_shape, kernel_size=2, stride=None):
    """d(loss)/dx: each output gradient goes to the position of its window's maximum (in gout's layout)."""
    xp = backend.array_module(gout)
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    n, c, ho, wo = gout.shape
    if (kh, kw) == (2, 2) and (sh, sw) == (2, 2):
        grad = empty_like_layout(gout, x_shape)
        grad[:, :, 2 * ho:] = 0  # rows and columns no window covers (odd sizes)
        grad[:, :, :, 2 * wo:] = 0
        inner = grad[:, :, :2 * ho, :2 * wo]

        def scatter(i):
            for position, target in enumerate(_windows_2x2(inner[i])):
                xp.multiply(gout[i], index[i] == position, out=target)

        _by_images(xp, inner, scatter)
        return grad
    grad = zeros_like_layout(gout, x_shape)
    for i in range(kh):
        for j in range(kw):
            target = grad[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            contribution = xp.where(index == i * kw + j, gout, 0)
            if sh >= kh and sw >= kw:  # non-overlapping windows: each pixel is written once
                target[...] = contribution
            else:
                target += contribution
    return grad


class MaxPool2d(Function):
    def __init__(self, kernel_size=2, stride=None):
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x):
        out, index = max_pool2d_forward(x, self.kernel_size, self.stride)
        if self.recording:
            self.index = index
            self.x_shape = x.shape
        return out

    def backward(self, g):
        return max_pool2d_backward(g, self.index, self.x_shape, self.kernel_size, self.stride)


def max_pool2d(x, kernel_size=2, stride=None):
    """Max over kernel_size windows (stride defaults to kernel_size); odd trailing rows/columns dropped."""
    return MaxPool2d(kernel_size, stride)(x)
