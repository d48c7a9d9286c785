"""Reductions: sum and mean over any axes (gradients broadcast back)."""
from __future__ import annotations

from nfed.common import backend
from nfed.core.autograd import Function


def _axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


class Sum(Function):
    def __init__(self, axis=None, keepdims: bool = False, scale: float = 1.0):
        self.axis = axis
        self.keepdims = keepdims
        self.scale = scale

    def forward(self, x):
        self.in_shape = x.shape
        out = x.sum(axis=self.axis, keepdims=self.keepdims)
        if self.scale != 1.0:
            out = out * x.dtype.type(self.scale)
        return backend.array_module(x).asarray(out)

    def backward(self, g):
        xp = backend.array_module(g)
        axes = _axes(self.axis, len(self.in_shape))
        if not self.keepdims:
            kept = [1 if i in axes else s for i, s in enumerate(self.in_shape)]
            g = g.reshape(kept)
        if self.scale != 1.0:
            g = g * g.dtype.type(self.scale)
        return xp.broadcast_to(g, self.in_shape)


def sum(x, axis=None, keepdims: bool = False):  # noqa: A001 - mirrors numpy's name
    """Sum over `axis` (None: all)."""
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims: bool = False):
    """Mean over `axis` (None: all)."""
    shape = x.shape
    count = 1
    for a in _axes(axis, len(shape)):
        count *= shape[a]
    return Sum(axis, keepdims, scale=1.0 / count)(x)
