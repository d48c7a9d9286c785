"""Activations: relu, sigmoid, softmax, log_softmax (numerically stable)."""
from __future__ import annotations

from nfed.common import backend
from nfed.core.autograd import Function


class ReLU(Function):
    def forward(self, x):
        out = backend.array_module(x).maximum(x, 0)
        if self.recording:
            self.positive = out > 0  # a bool mask: a quarter of the memory of the float32 input
        return out

    def backward(self, g):
        return g * self.positive


class Sigmoid(Function):
    def forward(self, x):
        xp = backend.array_module(x)
        out = xp.tanh(x * x.dtype.type(0.5))  # 1/(1+e^-x) = (1 + tanh(x/2))/2: no overflow for any x
        out += 1
        out *= 0.5
        if self.recording:
            self.out = out
        return out

    def backward(self, g):
        y = self.out
        return g * y * (1 - y)


class Softmax(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        out = softmax_array(x, self.axis)
        if self.recording:
            self.out = out
        return out

    def backward(self, g):
        y = self.out
        gy = g * y
        gy -= y * gy.sum(axis=self.axis, keepdims=True)
        return gy


class LogSoftmax(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        out = log_softmax_array(x, self.axis)
        if self.recording:
            self.out = out
        return out

    def backward(self, g):
        xp = backend.array_module(g)
        return g - xp.exp(self.out) * g.sum(axis=self.axis, keepdims=True)


def log_softmax_array(x, axis: int):
    """log(softmax(x)) on a raw array, shifted by the max so exp never overflows."""
    xp = backend.array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


def softmax_array(x, axis: int):
    """softmax(x) on a raw array, shifted by the max so exp never overflows."""
    xp = backend.array_module(x)
    out = xp.exp(x - x.max(axis=axis, keepdims=True))
    out /= out.sum(axis=axis, keepdims=True)
    return out


def relu(x):
    """max(x, 0)."""
    return ReLU()(x)


def sigmoid(x):
    """1 / (1 + exp(-x)), stable for any x."""
    return Sigmoid()(x)


def softmax(x, axis: int = 1):
    """exp(x) / sum(exp(x)) along `axis` (channels by default)."""
    return Softmax(axis)(x)


def log_softmax(x, axis: int = 1):
    """log(softmax(x)) along `axis`, computed without overflow."""
    return LogSoftmax(axis)(x)
