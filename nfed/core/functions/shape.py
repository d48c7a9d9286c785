"""Shape ops: reshape, transpose, concat, indexing."""
from __future__ import annotations

import numbers

from nfed.common import backend
from nfed.core.autograd import Function, Tensor
from nfed.core.functions.layout import concatenate, is_channels_last, to_channels_last


class Reshape(Function):
    def __init__(self, shape: tuple):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        if self.axes is None:
            self.axes = tuple(reversed(range(x.ndim)))
        return x.transpose(self.axes)

    def backward(self, g):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return g.transpose(inverse)


class Concat(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *arrays):
        self.sizes = [a.shape[self.axis] for a in arrays]
        return concatenate(arrays, self.axis)

    def backward(self, g):
        grads = []
        start = 0
        axis = self.axis % g.ndim
        compact = is_channels_last(g)  # hand on compact channels-last slices, not strided views
        for size, needed in zip(self.sizes, self.needs_input_grad):
            index = (slice(None),) * axis + (slice(start, start + size),)
            grads.append((to_channels_last(g[index]) if compact else g[index]) if needed else None)
            start += size
        return tuple(grads)


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (numbers.Integral, slice)) or i is None or i is Ellipsis for i in items)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.in_shape = x.shape
        self.in_dtype = x.dtype
        return x[self.index]

    def backward(self, g):
        xp = backend.array_module(g)
        grad = xp.zeros(self.in_shape, dtype=self.in_dtype)
        if _is_basic_index(self.index):
            grad[self.index] = g
        else:  # advanced indexing may repeat elements: accumulate
            xp.add.at(grad, self.index, g)
        return grad


def reshape(x, *shape):
    """x reshaped (`reshape(x, 2, 3)` or `reshape(x, (2, 3))`)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(shape)(x)


def transpose(x, *axes):
    """Axes permuted (none given: reversed)."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose(axes or None)(x)


def concat(tensors, axis: int = 1):
    """Join tensors along `axis` (channels by default)."""
    return Concat(axis)(*tensors)


def getitem(x, index):
    """x[index] (basic or advanced indexing); Tensors inside the index are used as raw arrays."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem(index)(x)
