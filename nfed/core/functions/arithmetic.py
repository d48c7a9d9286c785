"""Element-wise arithmetic with NumPy broadcasting: add, sub, mul, div, neg, pow, exp, log."""
from __future__ import annotations

from nfed.common import backend
from nfed.core.autograd import Function
from nfed.core.functions.utils import tensor_operands, unbroadcast


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                unbroadcast(g, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                unbroadcast(-g, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        if self.recording:  # d(ab)/da needs b and vice versa: keep only what is needed
            self.a = a if self.needs_input_grad[1] else None
            self.b = b if self.needs_input_grad[0] else None
            self.shapes = (a.shape, b.shape)
        return a * b

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g * self.b, sa) if self.needs_input_grad[0] else None,
                unbroadcast(g * self.a, sb) if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        out = a / b
        if self.recording:
            self.b = b
            self.out = out if self.needs_input_grad[1] else None
            self.shapes = (a.shape, b.shape)
        return out

    def backward(self, g):
        sa, sb = self.shapes
        ga = g / self.b
        return (unbroadcast(ga, sa) if self.needs_input_grad[0] else None,
                unbroadcast(-ga * self.out, sb) if self.needs_input_grad[1] else None)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Pow(Function):
    """x ** p for a constant exponent p."""

    def __init__(self, exponent: float):
        self.exponent = exponent

    def forward(self, x):
        if self.recording:
            self.x = x
        return x ** self.exponent

    def backward(self, g):
        p = self.exponent
        return g * (p * self.x ** (p - 1))


class Exp(Function):
    def forward(self, x):
        out = backend.array_module(x).exp(x)
        if self.recording:
            self.out = out
        return out

    def backward(self, g):
        return g * self.out


class Log(Function):
    def forward(self, x):
        if self.recording:
            self.x = x
        return backend.array_module(x).log(x)

    def backward(self, g):
        return g / self.x


def add(a, b):
    """a + b with broadcasting."""
    return Add()(*tensor_operands(a, b))


def sub(a, b):
    """a - b with broadcasting."""
    return Sub()(*tensor_operands(a, b))


def mul(a, b):
    """a * b with broadcasting."""
    return Mul()(*tensor_operands(a, b))


def div(a, b):
    """a / b with broadcasting."""
    return Div()(*tensor_operands(a, b))


def neg(x):
    return Neg()(x)


def pow(x, exponent: float):  # noqa: A001 - mirrors the operator name
    """x ** exponent (constant exponent)."""
    return Pow(exponent)(x)


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)
