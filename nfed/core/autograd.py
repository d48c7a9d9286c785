"""Reverse-mode automatic differentiation on raw NumPy/CuPy arrays.

A `Tensor` wraps a raw array. Calling a `Function` on tensors computes the forward pass on raw arrays and,
when grad mode is on and some input requires a gradient, records one graph node. The node keeps edges to
its inputs' nodes (never the input tensors' data) plus whatever its `forward` chose to save for `backward`,
so intermediate activations die as soon as no backward needs them. `Tensor.backward` walks the graph in
topological order with an explicit work list (no recursion: chains of any length work), accumulates the
gradients of reused nodes, stores gradients only on leaf tensors (like PyTorch) and releases each node's
saved buffers once its backward has run.
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from nfed.common import backend

__all__ = ["Tensor", "Function", "as_tensor", "no_grad", "enable_grad", "is_grad_enabled", "set_grad_enabled",
           "op_timer"]


class _GradMode(threading.local):
    enabled = True


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    """True when calling a Function records graph nodes (per thread)."""
    return _grad_mode.enabled


@contextlib.contextmanager
def set_grad_enabled(mode: bool):
    """Turn graph recording on or off inside the block (per thread), restoring the old mode after."""
    previous = _grad_mode.enabled
    _grad_mode.enabled = bool(mode)
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def no_grad():
    """Context manager: no graph is recorded inside (evaluation, optimiser updates)."""
    return set_grad_enabled(False)


def enable_grad():
    """Context manager: graph recording on inside, even within `no_grad()`."""
    return set_grad_enabled(True)


_op_timer = None  # record(phase, function, seconds) while an op_timer() block runs


@contextlib.contextmanager
def op_timer(record):
    """Inside: record("forward" | "backward", function, seconds) after every Function's forward and backward
    (host wall time: a profile of where a CPU step goes, e.g. `nfed bench step --op-profile`)."""
    global _op_timer
    previous, _op_timer = _op_timer, record
    try:
        yield
    finally:
        _op_timer = previous


def _timed(phase: str, function, method, *arrays):
    start = time.perf_counter()
    result = method(*arrays)
    _op_timer(phase, function, time.perf_counter() - start)
    return result


def _ops():
    """The arithmetic/shape functions behind Tensor's operators (imported late: functions depends on us)."""
    global _OPS
    if _OPS is None:
        from nfed.core import functions
        _OPS = functions
    return _OPS


_OPS = None


class Tensor:
    """A raw array plus what autodiff needs: `requires_grad`, the leaf gradient `grad`, the creating node."""

    __slots__ = ("data", "grad", "requires_grad", "_creator", "_output_index", "__weakref__")
    # Make NumPy defer to our reflected operators (ndarray + Tensor -> Tensor.__radd__).
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        elif not isinstance(data, np.ndarray) and not backend.is_gpu_array(data):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._creator = None
        self._output_index = 0

    # --- array-like properties -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> backend.Device:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._creator is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={tuple(self.shape)}, dtype={self.dtype}{flag})"

    def item(self):
        """The single value as a Python scalar."""
        return self.data.item()

    def numpy(self) -> np.ndarray:
        """A host (NumPy) copy of the data."""
        return np.array(backend.to_numpy(self.data), copy=True)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    # --- autodiff ----------------------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` (grad defaults to 1 for a single value)."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no graph was recorded)")
        xp = backend.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single value, got shape {self.shape}")
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise RuntimeError(f"backward() gradient shape {grad.shape} differs from tensor shape {self.shape}")
        if self._creator is None:
            _accumulate_leaf(self, grad)
            return
        _run_backward(self._creator, self._output_index, grad, retain_graph)

    # --- operators (differentiable; see nfed.core.functions) ---------------------------------------------------
    def __add__(self, other):
        return _ops().add(self, other)

    def __radd__(self, other):
        return _ops().add(other, self)

    def __sub__(self, other):
        return _ops().sub(self, other)

    def __rsub__(self, other):
        return _ops().sub(other, self)

    def __mul__(self, other):
        return _ops().mul(self, other)

    def __rmul__(self, other):
        return _ops().mul(other, self)

    def __truediv__(self, other):
        return _ops().div(self, other)

    def __rtruediv__(self, other):
        return _ops().div(other, self)

    def __neg__(self):
        return _ops().neg(self)

    def __pow__(self, exponent):
        return _ops().pow(self, exponent)

    def __getitem__(self, index):
        return _ops().getitem(self, index)

    def sum(self, axis=None, keepdims: bool = False):
        return _ops().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return _ops().mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        return _ops().reshape(self, *shape)

    def transpose(self, *axes):
        return _ops().transpose(self, *axes)


def as_tensor(x) -> Tensor:
    """`x` itself when it is a Tensor, else a Tensor (no grad) around it."""
    return x if isinstance(x, Tensor) else Tensor(x)


class Function:
    """One differentiable operation. Subclasses implement `forward(*arrays)` and `backward(*grad_outputs)`.

    `forward` receives raw arrays and returns an array or a tuple of arrays; it may save on `self` what
    `backward` needs (only when `self.recording` is true: otherwise nothing will call backward).
    `backward` receives one raw gradient per output and returns one gradient (or None) per input; it may
    skip inputs whose `self.needs_input_grad[i]` is false. Non-tensor arguments go to `__init__`.
    """

    needs_input_grad: tuple = ()
    recording: bool = False

    def __call__(self, *inputs):
        return self.apply(*inputs)

    def apply(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        needs = tuple(t.requires_grad for t in tensors)
        recording = _grad_mode.enabled and any(needs)
        self.needs_input_grad = needs
        self.recording = recording
        arrays = [t.data for t in tensors]
        outputs = self.forward(*arrays) if _op_timer is None else _timed("forward", self, self.forward, *arrays)
        single = not isinstance(outputs, tuple)
        if single:
            outputs = (outputs,)
        results = []
        for index, out in enumerate(outputs):
            t = Tensor.__new__(Tensor)
            t.data = out
            t.grad = None
            t.requires_grad = recording
            t._creator = self if recording else None
            t._output_index = index
            results.append(t)
        if recording:
            # Edges to the inputs' nodes: a leaf tensor (gets .grad), (node, output index), or None.
            self._edges = [(t if t._creator is None else (t._creator, t._output_index)) if t.requires_grad
                           else None for t in tensors]
            self._output_meta = [(o.shape, o.dtype) for o in outputs]
        return results[0] if single else tuple(results)

    def forward(self, *arrays):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, *grad_outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:
        """Drop everything saved for backward and the graph edges (called after backward)."""
        self.__dict__.clear()
        self._released = True


def _accumulate_leaf(leaf: Tensor, grad) -> None:
    if grad.shape != leaf.data.shape:
        raise RuntimeError(f"internal error: gradient shape {grad.shape} for a leaf of shape {leaf.data.shape}")
    if grad.dtype != leaf.data.dtype:
        grad = grad.astype(leaf.data.dtype)
    if leaf.grad is None:
        if isinstance(grad, np.ndarray) and not grad.flags.writeable:  # e.g. a broadcast view
            grad = grad.copy()
        leaf.grad = grad
    else:  # out of place: gradients handed down by backward may alias other arrays
        leaf.grad = leaf.grad + grad


def _run_backward(root: Function, root_index: int, grad, retain_graph: bool) -> None:
    # 1. Discover the nodes reachable from the root and count, for each, the edges that lead into it.
    pending = {}
    stack = [root]
    seen = {root}
    while stack:
        node = stack.pop()
        if getattr(node, "_released", False):
            raise RuntimeError("backward through a graph whose buffers were already released; "
                               "pass retain_graph=True to the first backward() to go through it twice")
        for edge in node._edges:
            if edge is None or isinstance(edge, Tensor):
                continue
            parent = edge[0]
            pending[parent] = pending.get(parent, 0) + 1
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    # 2. Kahn's algorithm: a node runs once every consumer has handed its gradient down.
    grads = {root: [None] * len(root._output_meta)}
    grads[root][root_index] = grad
    ready = [root]
    while ready:
        node = ready.pop()
        grad_outputs = grads.pop(node, None)
        if grad_outputs is not None and any(g is not None for g in grad_outputs):
            if any(g is None for g in grad_outputs):
                xp = backend.array_module(*[g for g in grad_outputs if g is not None])
                grad_outputs = [xp.zeros(shape, dtype) if g is None else g
                                for g, (shape, dtype) in zip(grad_outputs, node._output_meta)]
            if _op_timer is None:
                input_grads = node.backward(*grad_outputs)
            else:
                input_grads = _timed("backward", node, node.backward, *grad_outputs)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(node._edges):
                raise RuntimeError(f"{type(node).__name__}.backward returned {len(input_grads)} gradients "
                                   f"for {len(node._edges)} inputs")
        else:
            input_grads = (None,) * len(node._edges)
        for edge, g in zip(node._edges, input_grads):
            if edge is None:
                continue
            if isinstance(edge, Tensor):
                if g is not None:
                    _accumulate_leaf(edge, g)
                continue
            parent, index = edge
            if g is not None:
                slots = grads.get(parent)
                if slots is None:
                    slots = grads[parent] = [None] * len(parent._output_meta)
                slots[index] = g if slots[index] is None else slots[index] + g
            pending[parent] -= 1
            if pending[parent] == 0:
                ready.append(parent)
        if not retain_graph:
            node.release()
