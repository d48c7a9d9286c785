"""Channels-last storage of CPU activations: NCHW-shaped NumPy views of NHWC memory.

Every op sees the PyTorch shape [N, C, H, W]; only the strides differ. The CPU convolutions produce this
layout because a pixel's channels are then contiguous: a patch row is a few memcpy runs and a matrix product
writes output pixels that are already the result (conv_cpu.py). Element-wise NumPy ufuncs keep the layout of
their inputs, so batch norm, ReLU and pooling carry it through; ops that allocate use `empty_like_layout`.
CuPy arrays and standard NCHW arrays pass through every helper unchanged.
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend

# Per-channel broadcasts over [pixels, C] rows run NumPy inner loops of only C elements; grouping pixels into
# rows of about this many values keeps the loops long (see ChannelView).
WIDE_ROW_VALUES = 512


def is_channels_last(x) -> bool:
    """A 4-D NumPy array whose memory is [N, H, W, C] in C order (1x1 images count as both layouts)."""
    return (isinstance(x, np.ndarray) and not backend.is_gpu_array(x) and x.ndim == 4
            and x.transpose(0, 2, 3, 1).flags.c_contiguous and not x.flags.c_contiguous)


def channels_innermost(x) -> bool:
    """A 4-D NumPy array (or view, e.g. a channel slice of a channels-last one) whose channels are adjacent."""
    return (isinstance(x, np.ndarray) and not backend.is_gpu_array(x) and x.ndim == 4 and x.shape[1] > 1
            and x.strides[1] == x.itemsize)


def nhwc(x):
    """The [N, H, W, C] view of an NCHW-shaped array (contiguous when x is channels-last)."""
    return x.transpose(0, 2, 3, 1)


def from_nhwc(a):
    """The NCHW-shaped view of an [N, H, W, C] array."""
    return a.transpose(0, 3, 1, 2)


def empty_channels_last(shape, dtype):
    """Uninitialised NCHW-shaped array with channels-last memory."""
    n, c, h, w = shape
    return from_nhwc(np.empty((n, h, w, c), dtype=dtype))


def to_channels_last(x):
    """x itself when channels-last, else a compact channels-last copy (4-D NumPy arrays only)."""
    if is_channels_last(x):
        return x
    out = empty_channels_last(x.shape, x.dtype)
    nhwc(out)[...] = nhwc(x)
    return out


def empty_like_layout(x, shape=None, dtype=None):
    """Uninitialised array like x (optionally another shape/dtype of the same rank), channels-last when x has
    its channels innermost."""
    shape = x.shape if shape is None else tuple(shape)
    dtype = x.dtype if dtype is None else dtype
    if channels_innermost(x):
        return empty_channels_last(shape, dtype)
    return backend.array_module(x).empty(shape, dtype=dtype)


def zeros_like_layout(x, shape=None, dtype=None):
    out = empty_like_layout(x, shape, dtype)
    out[...] = 0
    return out


def channel_row(values, times: int, dtype=None):
    """Per-channel values [C] repeated `times` times as one row [times * C], on the values' device (xp.tile
    without its Python overhead, which counts at about 400 calls a training step)."""
    xp = backend.array_module(values)
    values = xp.asarray(values)
    row = xp.empty((times, values.shape[-1]), dtype=values.dtype if dtype is None else dtype)
    row[...] = values
    return row.reshape(-1)


def _pixel_group(pixels: int, channels: int) -> int:
    """Whole pixels per wide row: the largest divisor of `pixels` with group * channels <= WIDE_ROW_VALUES."""
    group = max(1, min(pixels, WIDE_ROW_VALUES // max(1, channels)))
    while pixels % group:
        group -= 1
    return group


class ChannelView:
    """Per-channel arithmetic on an [N, C, ...] array of either layout without copying it.

    NCHW arrays are seen as [N, C, S] with parameters broadcast as [1, C, 1]; channels-last arrays as rows
    of k whole pixels ([P/k, k*C]) with parameters tiled k times, so NumPy's inner loops stay long.
    `view(a)` gives that form of any array laid out like x, `wrap(v)` turns it back into x's shape,
    `per_channel(v)` broadcasts a [C] vector and `sums(v)` reduces a view-shaped array to [C].
    """

    def __init__(self, x):
        self.shape = x.shape
        self.channels = x.shape[1]
        self.channels_last = is_channels_last(x)
        if self.channels_last:
            pixels = x.size // self.channels
            self.group = _pixel_group(pixels, self.channels)
            self.rows = (pixels // self.group, self.group * self.channels)
        else:
            self.rows = (x.shape[0], self.channels, x.size // max(1, x.shape[0] * self.channels))

    def view(self, a):
        if self.channels_last:
            return nhwc(a).reshape(self.rows)
        return a.reshape(self.rows)

    def wrap(self, v):
        if self.channels_last:
            n, c, h, w = self.shape
            return from_nhwc(v.reshape(n, h, w, c))
        return v.reshape(self.shape)

    def per_channel(self, values):
        if self.channels_last:
            return channel_row(values, self.group)
        return values.reshape(1, self.channels, 1)

    def sums(self, v):
        if self.channels_last:
            return v.sum(axis=0).reshape(self.group, self.channels).sum(axis=0)
        return v.sum(axis=2).sum(axis=0)


def concatenate(arrays, axis: int):
    """xp.concatenate whose result is channels-last when the first array has its channels innermost (NumPy's
    own returns C order)."""
    first = arrays[0]
    if not channels_innermost(first):
        return backend.array_module(*arrays).concatenate(arrays, axis=axis)
    axis = axis % first.ndim
    shape = list(first.shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = empty_channels_last(shape, np.result_type(*arrays))
    start = 0
    for a in arrays:
        index = (slice(None),) * axis + (slice(start, start + a.shape[axis]),)
        out[index] = a
        start += a.shape[axis]
    return out
