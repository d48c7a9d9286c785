"""Small helpers shared by the op families: argument normalisation and gradient un-broadcasting."""
from __future__ import annotations

import numbers

from nfed.common import backend
from nfed.core.autograd import Tensor


def pair(value) -> tuple[int, int]:
    """(h, w) from an int or a pair (kernel sizes, strides, paddings)."""
    if isinstance(value, numbers.Integral):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def unbroadcast(grad, shape: tuple):
    """Sum `grad` down to `shape`: the adjoint of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, size in enumerate(shape)
                                       if size == 1 and grad.shape[extra + i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def tensor_operands(a, b):
    """Two operands as Tensors; a Python scalar takes the other operand's dtype and array module
    (so `x * 2.0` keeps float32 instead of promoting to float64)."""
    if isinstance(a, numbers.Number) and not isinstance(b, numbers.Number):
        b = b if isinstance(b, Tensor) else Tensor(b)
        a = Tensor(backend.array_module(b.data).asarray(a, dtype=b.dtype))
    elif isinstance(b, numbers.Number) and not isinstance(a, numbers.Number):
        a = a if isinstance(a, Tensor) else Tensor(a)
        b = Tensor(backend.array_module(a.data).asarray(b, dtype=a.dtype))
    return a, b


def raw(x):
    """The raw array behind a Tensor (or `x` itself)."""
    return x.data if isinstance(x, Tensor) else x
