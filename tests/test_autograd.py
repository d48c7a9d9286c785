"""Autodiff engine: graph building, iterative backward, accumulation, no_grad, buffer release."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.autograd import Function, Tensor, as_tensor, is_grad_enabled, no_grad
from nfed.core.gradcheck import check_gradients


def test_tensor_basics():
    t = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and t.dtype == np.float32 and t.requires_grad
    assert t.grad is None and t.is_leaf
    d = t.detach()
    assert not d.requires_grad and d.data is t.data
    host = t.numpy()
    host[0, 0] = 99
    assert t.data[0, 0] == 0  # numpy() is a copy
    assert Tensor(3.5).item() == 3.5
    assert as_tensor(t) is t and isinstance(as_tensor([1.0, 2.0]), Tensor)


def test_scalar_operands_keep_float32():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (2.0 * x + 1) / 3.0 - x * 0.5
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, np.full(3, 2 / 3 - 0.5), rtol=1e-6)


def test_numpy_array_on_the_left_defers_to_tensor():
    x = Tensor(np.ones(3), requires_grad=True)
    y = np.full(3, 2.0) * x
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2.0)


def test_reused_node_accumulates():
    x = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    a = x * x          # used three times below
    y = a * a + a + F.exp(a)
    y.sum().backward()
    xv = x.data
    expected = (4 * xv ** 3) + 2 * xv + np.exp(xv ** 2) * 2 * xv
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12)


def test_leaf_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3.0 + 2 * x.data)


def test_long_chain_has_no_recursion_limit():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(6000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 6000], rtol=1e-9)


def test_no_grad_records_nothing():
    x = Tensor(np.ones(2), requires_grad=True)
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = x * 2.0
    assert is_grad_enabled()
    assert not y.requires_grad and y._creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_no_node_when_no_input_requires_grad():
    y = F.relu(Tensor(np.ones(3))) + 1.0
    assert not y.requires_grad and y._creator is None


class _Square(Function):
    def forward(self, x):
        if self.recording:
            self.x = x
        return x * x

    def backward(self, g):
        return 2 * self.x * g


def test_saved_buffers_released_after_backward():
    x = Tensor(np.random.default_rng(0).standard_normal(5), requires_grad=True)
    h = x * 2.0                 # an intermediate the graph must not pin
    y = _Square()(h)
    saved = weakref.ref(y._creator.x)
    intermediate = weakref.ref(h.data)
    del h
    gc.collect()
    assert saved() is not None  # still needed for backward
    y.sum().backward()
    gc.collect()
    assert saved() is None and intermediate() is None
    assert x.grad is not None


def test_node_keeps_edges_not_input_data():
    x = Tensor(np.ones(4), requires_grad=True)
    h = x * 3.0  # mul keeps only the constant operand
    data_ref = weakref.ref(h.data)
    y = F.relu(h)  # relu keeps a boolean mask only, not its input
    del h
    gc.collect()
    assert data_ref() is None
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 3.0)


def test_second_backward_needs_retain_graph():
    x = Tensor(np.array([2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, [8.0])
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_backward_of_non_scalar_needs_grad():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="single value"):
        (x * 2.0).backward()
    (x * 2.0).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad, [2.0, 4.0, 6.0])


class _SplitHalves(Function):
    """Two outputs, to check multi-output nodes (one output unused)."""

    def forward(self, x):
        half = x.shape[0] // 2
        return x[:half] * 2, x[half:] * 3

    def backward(self, ga, gb):
        return np.concatenate([ga * 2, gb * 3])


def test_multi_output_function_with_unused_output():
    x = Tensor(np.arange(4.0), requires_grad=True)
    a, _ = _SplitHalves()(x)
    a.sum().backward()
    np.testing.assert_allclose(x.grad, [2, 2, 0, 0])


def test_grad_flows_only_to_inputs_that_need_it():
    x = Tensor(np.ones(3), requires_grad=True)
    c = Tensor(np.full(3, 5.0))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, 5.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_broadcasting_binary_ops_gradcheck(device, op):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((2, 3, 4)))
    b = xp.asarray(rng.standard_normal((3, 1)) + 3.0)
    fn = getattr(F, op)
    check_gradients(lambda p, q: fn(p, q), [a, b])
    check_gradients(lambda p, q: fn(q, p), [a, b])


@pytest.mark.parametrize("device", DEVICES)
def test_unary_ops_gradcheck(device):
    xp = backend.parse_device(device).xp
    x = xp.asarray(np.random.default_rng(2).random((3, 4)) + 0.5)
    check_gradients(F.neg, [x])
    check_gradients(F.exp, [x])
    check_gradients(F.log, [x])
    check_gradients(lambda t: F.pow(t, 3), [x])
    check_gradients(lambda t: t ** -1.5, [x])


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_and_shape_ops_gradcheck(device):
    xp = backend.parse_device(device).xp
    x = xp.asarray(np.random.default_rng(3).standard_normal((2, 3, 4)))
    check_gradients(lambda t: F.sum(t), [x])
    check_gradients(lambda t: F.sum(t, axis=(0, 2), keepdims=True), [x])
    check_gradients(lambda t: F.mean(t, axis=1), [x])
    check_gradients(lambda t: t.mean(), [x])
    check_gradients(lambda t: F.reshape(t, 4, 6), [x])
    check_gradients(lambda t: t.reshape((6, 4)), [x])
    check_gradients(lambda t: F.transpose(t, 2, 0, 1), [x])
    check_gradients(lambda t: t[:, 1:, ::2], [x])
    check_gradients(lambda t: t[xp.asarray([0, 0, 1])], [x])  # repeated rows accumulate


def test_forward_values_of_elementwise_and_reductions():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal(3) + 3
    np.testing.assert_allclose((Tensor(a) + b).data, a + b)
    np.testing.assert_allclose((Tensor(a) - b).data, a - b)
    np.testing.assert_allclose((Tensor(a) * b).data, a * b)
    np.testing.assert_allclose((Tensor(a) / b).data, a / b)
    np.testing.assert_allclose((-Tensor(a)).data, -a)
    np.testing.assert_allclose(F.sum(a, axis=0).data, a.sum(0))
    np.testing.assert_allclose(F.mean(a, axis=1, keepdims=True).data, a.mean(1, keepdims=True))
    np.testing.assert_allclose(F.reshape(a, 3, 2).data, a.reshape(3, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_concat_forward_and_gradcheck(device):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(5)
    a = xp.asarray(rng.standard_normal((2, 2, 3, 3)))
    b = xp.asarray(rng.standard_normal((2, 3, 3, 3)))
    out = F.concat([Tensor(a), Tensor(b)], axis=1)
    np.testing.assert_array_equal(backend.to_numpy(out.data),
                                  np.concatenate([backend.to_numpy(a), backend.to_numpy(b)], axis=1))
    check_gradients(lambda p, q: F.concat([p, q], axis=1), [a, b])
    check_gradients(lambda p, q: F.concat([p, q, p], axis=1), [a, b])  # reused input
    check_gradients(lambda p: F.concat([p, p], axis=-1), [a])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_are_preserved(dtype, incoming_grad_dtypes):
    x = Tensor(np.ones((2, 3), dtype=dtype), requires_grad=True)
    y = F.concat([x * 2, x], axis=1).mean()
    assert y.dtype == dtype
    y.backward()
    assert x.grad.dtype == dtype
    assert incoming_grad_dtypes == [(np.dtype(dtype), np.dtype(dtype))] * 2   # not cast on the way in
