"""Finite-difference gradient checks for Functions and whole models (used by the test-suite).

The output is projected on a fixed random tensor r, so one scalar L = sum(r * f(x)) is differentiated.
Small inputs are checked element by element; large ones along a few random directions v, comparing
<dL/dx, v> with (L(x + eps v) - L(x - eps v)) / (2 eps): one difference per direction instead of one per
element (Chainer's trick). Use float64 inputs.
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.core.autograd import Tensor, no_grad


def _scalar(fn, arrays, projection):
    with no_grad():
        out = fn(*[Tensor(a) for a in arrays])
    return float((out.data * projection).sum())


def check_gradients(fn, inputs, *, wrt=None, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5,
                    elementwise_limit: int = 64, directions: int = 3, seed: int = 0) -> None:
    """Raise AssertionError unless fn's analytic gradients match central differences.

    fn(*tensors) -> Tensor; `inputs` raw float arrays (NumPy or CuPy); `wrt` indices of the inputs to
    check (default: all floating-point ones).
    """
    xp = backend.array_module(*inputs)
    rng = np.random.default_rng(seed)
    arrays = [xp.asarray(a) for a in inputs]
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    tensors = [Tensor(a.copy(), requires_grad=i in wrt) for i, a in enumerate(arrays)]
    out = fn(*tensors)
    projection = xp.asarray(rng.standard_normal(out.shape)).astype(out.dtype)
    if out.data.ndim == 0:
        projection = xp.asarray(1.0, dtype=out.dtype)
    out.backward(projection)
    for i in wrt:
        analytic = tensors[i].grad
        if analytic is None:
            analytic = xp.zeros_like(arrays[i])
        analytic = backend.to_numpy(analytic).astype(np.float64)

        def shifted(delta):
            moved = list(arrays)
            moved[i] = arrays[i] + delta
            return _scalar(fn, moved, projection)

        if arrays[i].size <= elementwise_limit:
            numeric = np.zeros(arrays[i].shape)
            for index in np.ndindex(arrays[i].shape):
                delta = xp.zeros_like(arrays[i])
                delta[index] = eps
                numeric[index] = (shifted(delta) - shifted(-delta)) / (2 * eps)
            if not np.allclose(analytic, numeric, atol=atol, rtol=rtol):
                worst = np.abs(analytic - numeric).max()
                raise AssertionError(f"input {i}: analytic and numerical gradients differ (max abs diff {worst:.3g})")
        else:
            for _ in range(directions):
                v = rng.standard_normal(arrays[i].shape)
                v /= np.linalg.norm(v)
                delta = xp.asarray(v * eps).astype(arrays[i].dtype)
                numeric = (shifted(delta) - shifted(-delta)) / (2 * eps)
                projected = float((analytic * v).sum())
                if not np.isclose(projected, numeric, atol=atol, rtol=rtol):
                    raise AssertionError(f"input {i}: directional derivative {projected:.10g} != numerical "
                                         f"{numeric:.10g}")
