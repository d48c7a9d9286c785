"""How nfed.core's ops reach the GPU: explicitly, per call, by the type of their arrays.

An op on raw arrays that has a CUDA implementation in nfed.gpu is decorated with `gpu_implementation`,
next to its own (array-agnostic) code, naming the GPU function it hands CuPy arrays to:

    @gpu_implementation(lambda: _gpu_conv().conv2d_forward)
    def conv2d_forward(x, w, b=None, stride=1, padding=0): ...

Nothing is replaced or patched: a call with a NumPy first argument runs the code below the decorator; a call
with a CuPy one runs the named GPU function (its module imported at that first GPU call, so importing nfed
never loads CuPy nor touches CUDA), and the code below when the GPU function raises backend.Unsupported
(arguments its kernels do not take, e.g. unequal strides).
"""
from __future__ import annotations

import functools

from nfed.common import backend


def gpu_implementation(load):
    """Decorator: calls whose first argument is a CuPy array go to `load()` (a function with the same
    parameters), the others, and those it refuses with backend.Unsupported, to the decorated function."""

    def decorate(function):
        @functools.wraps(function)
        def op(*args, **kwargs):
            if args and backend.is_gpu_array(args[0]):
                try:
                    return load()(*args, **kwargs)
                except backend.Unsupported:
                    pass
            return function(*args, **kwargs)

        op.array_agnostic = function
        op.gpu_implementation = load
        return op

    return decorate
