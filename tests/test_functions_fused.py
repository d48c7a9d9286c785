"""conv_bn_relu (functions/fused.py) against the three separate ops, finite differences and float64."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.core import functions as F
from nfed.core.autograd import Tensor, no_grad
from nfed.core.functions import fused
from nfed.core.gradcheck import check_gradients


def channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def composed(x, w, b, gamma, beta, rm, rv, training, padding=1):
    return F.relu(F.batch_norm(F.conv2d(x, w, b, 1, padding), gamma, beta, rm, rv, training))


def _case(rng, n=3, c=5, h=6, w=8, o=4, kernel=3):
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((o, c, kernel, kernel)) * 0.3
    gamma = rng.standard_normal(o)  # some negative: the ReLU mask must follow the sign
    beta, bias = rng.standard_normal(o), rng.standard_normal(o) + 3.0
    return x, weight, bias, gamma, beta


def _run(fn, arrays, g, stats):
    tensors = [None if a is None else Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors, stats[0], stats[1])
    out.backward(g)
    return out.data, [None if t is None else t.grad for t in tensors]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 6, 8, 4, 3), (2, 3, 4, 4, 16, 3), (2, 6, 5, 7, 3, 1)])
def test_training_matches_the_separate_ops(layout, with_bias, shape):
    rng = np.random.default_rng(0)
    n, c, h, w, o, kernel = shape
    x, weight, bias, gamma, beta = _case(rng, n, c, h, w, o, kernel)
    x = channels_last(x) if layout == "channels_last" else x
    bias = bias if with_bias else None
    padding = kernel // 2
    g = rng.standard_normal((n, o, h, w))
    results = []
    for fn in (fused.conv_bn_relu, composed):
        stats = (np.full(o, 0.5), np.full(o, 2.0))
        y, grads = _run(lambda *a: fn(*a[:5], a[5], a[6], True, padding=padding) if fn is composed
                        else fn(*a[:5], a[5], a[6], True, 0.1, 1e-5, padding), [x, weight, bias, gamma, beta], g, stats)
        results.append((y, grads, stats))
    (y1, g1, s1), (y2, g2, s2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(s1, s2):  # running statistics updated alike
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_the_fused_op_is_used_on_the_cpu_and_the_switch_turns_it_off(monkeypatch):
    rng = np.random.default_rng(1)
    x, weight, bias, gamma, beta = (Tensor(a, requires_grad=True) for a in _case(rng))
    out = F.conv_bn_relu(x, weight, bias, gamma, beta, None, None, True)
    assert isinstance(out._creator, fused.ConvBNReLU)
    monkeypatch.setattr(fused, "ENABLED", False)
    out = F.conv_bn_relu(x, weight, bias, gamma, beta, None, None, True)
    assert not isinstance(out._creator, fused.ConvBNReLU)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    arrays = list(_case(rng, n=2, c=3, h=5, w=4, o=3))
    check_gradients(lambda x, w, b, g, be: F.conv_bn_relu(x, w, b, g, be, None, None, True), arrays)


def test_evaluation_folds_the_running_statistics():
    rng = np.random.default_rng(3)
    x, weight, bias, gamma, beta = _case(rng)
    mean, var = rng.standard_normal(4), rng.random(4) + 0.5
    with no_grad():
        fast = F.conv_bn_relu(x, weight, bias, gamma, beta, mean, var, False)
        slow = composed(x, weight, bias, gamma, beta, mean, var, False)
    np.testing.assert_allclose(fast.data, slow.data, rtol=1e-10, atol=1e-10)
    # an evaluation-mode graph goes through the separate ops (and so keeps their gradients)
    xt = Tensor(x, requires_grad=True)
    out = F.conv_bn_relu(xt, weight, bias, gamma, beta, mean, var, False)
    assert not isinstance(out._creator, fused.ConvBNReLU)


def test_training_without_a_graph_updates_the_statistics_only():
    rng = np.random.default_rng(4)
    x, weight, bias, gamma, beta = _case(rng)
    mean, var = np.zeros(4), np.ones(4)
    with no_grad():
        out = F.conv_bn_relu(Tensor(x, requires_grad=True), weight, bias, gamma, beta, mean, var, True)
    assert out._creator is None and not out.requires_grad
    assert mean.any() and not np.allclose(var, 1.0)


def test_float32_is_accurate_when_the_mean_dwarfs_the_spread():
    """float32 stays close to float64 with a large common offset (conv bias 1000) on positive inputs."""
    rng = np.random.default_rng(5)
    arrays = [rng.random((4, 3, 16, 16)), rng.standard_normal((4, 3, 3, 3)) * 0.3, np.full(4, 1000.0),
              rng.standard_normal(4), rng.standard_normal(4)]
    g = rng.standard_normal((4, 4, 16, 16))
    reference = _run(lambda *a: F.conv_bn_relu(*a, True), arrays, g, (None, None))
    single = _run(lambda *a: F.conv_bn_relu(*a, True), [a.astype(np.float32) for a in arrays], g.astype(np.float32),
                  (None, None))
    np.testing.assert_allclose(single[0], reference[0], atol=1e-3)
    for lo, hi, name in zip(single[1], reference[1], ("x", "w", "b", "gamma", "beta")):
        if name != "b":  # the conv bias gradient is zero up to rounding (batch norm removes the mean)
            np.testing.assert_allclose(lo, hi, rtol=1e-2, atol=1e-2 * np.abs(hi).max(), err_msg=name)


def test_blocks_on_the_worker_pool_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(6)
    arrays = list(_case(rng, n=4, c=6, h=8, w=8, o=8))
    g = rng.standard_normal((4, 8, 8, 8))
    serial = _run(lambda *a: F.conv_bn_relu(*a, True), arrays, g, (None, None))
    monkeypatch.setattr(fused, "BLOCK_VALUES", 64)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    pooled = _run(lambda *a: F.conv_bn_relu(*a, True), arrays, g, (None, None))
    np.testing.assert_allclose(pooled[0], serial[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(pooled[1], serial[1]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
