"""Max pooling (floor mode, first maximum wins on ties, like PyTorch)."""
from __future__ import annotations

from .. import backend
from ..autograd import Function
from .im2col import conv_output_size
from .layout import zeros_like_layout
from .utils import pair


def max_pool2d_forward(x, kernel_size=2, stride=None):
    """(y, argmax) for x [N, C, H, W]; argmax (uint8) is the window position (i*kw + j) of each maximum."""
    xp = backend.array_module(x)
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, sh, 0), conv_output_size(w, kw, sw, 0)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"max_pool2d: window {kh}x{kw} larger than input {h}x{w}")
    if (kh, kw) == (2, 2) and (sh, sw) == (2, 2):
        x = x[:, :, :2 * ho, :2 * wo]
        a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
        cc, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
        top = xp.maximum(a, b)
        bottom = xp.maximum(cc, d)
        out = xp.maximum(top, bottom)
        # First maximum in scan order a, b, c, d: a strict ">" at each step keeps the earlier one.
        top_index = (b > a).astype(xp.uint8)
        bottom_index = (d > cc).astype(xp.uint8)
        bottom_index += 2
        return out, xp.where(bottom > top, bottom_index, top_index)
    s0, s1, s2, s3 = x.strides
    windows = xp.lib.stride_tricks.as_strided(x, (n, c, ho, wo, kh, kw), (s0, s1, s2 * sh, s3 * sw, s2, s3))
    windows = windows.reshape(n, c, ho, wo, kh * kw)
    index = windows.argmax(axis=-1)
    out = xp.take_along_axis(windows, index[..., None], axis=-1)[..., 0]
    return out, index.astype(xp.uint8 if kh * kw <= 256 else xp.int32)


def max_pool2d_backward(gout, index, x_shape, kernel_size=2, stride=None):
    """d(loss)/dx: each output gradient goes to the position of its window's maximum."""
    xp = backend.array_module(gout)
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride if stride is not None else kernel_size)
    n, c, ho, wo = gout.shape
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
