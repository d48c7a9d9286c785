"""Activations: relu, sigmoid, softmax, log_softmax (numerically stable); softmax and log_softmax along
axis 1 of CuPy arrays run nfed.gpu.softmax's one-pass kernels (nfed.core.dispatch)."""
from __future__ import annotations

from nfed.common import backend
from nfed.core.autograd import Function
from nfed.core.dispatch import gpu_implementation


def _gpu_softmax():
    from nfed.gpu import softmax  # noqa: PLC0415 - at the first CuPy call: importing nfed loads no CuPy

    return softmax


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
        return softmax_backward_array(g, self.out, self.axis)


class LogSoftmax(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        out = log_softmax_array(x, self.axis)
        if self.recording:
            self.out = out
        return out

    def backward(self, g):
        return log_softmax_backward_array(g, self.out, self.axis)


@gpu_implementation(lambda: _gpu_softmax().log_softmax)
def log_softmax_array(x, axis: int):
    """log(softmax(x)) on a raw array, shifted by the max so exp never overflows."""
    xp = backend.array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


@gpu_implementation(lambda: _gpu_softmax().softmax)
def softmax_array(x, axis: int):
    """softmax(x) on a raw array, shifted by the max so exp never overflows."""
    xp = backend.array_module(x)
    out = xp.exp(x - x.max(axis=axis, keepdims=True))
    out /= out.sum(axis=axis, keepdims=True)
    return out


@gpu_implementation(lambda: _gpu_softmax().softmax_backward)
def softmax_backward_array(g, y, axis: int):
    """Gradient of softmax from its output y: y * (g - sum(g * y))."""
    gy = g * y
    gy -= y * gy.sum(axis=axis, keepdims=True)
    return gy


@gpu_implementation(lambda: _gpu_softmax().log_softmax_backward)
def log_softmax_backward_array(g, y, axis: int):
    """Gradient of log_softmax from its output y: g - exp(y) * sum(g)."""
    xp = backend.array_module(g)
    return g - xp.exp(y) * g.sum(axis=axis, keepdims=True)


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
