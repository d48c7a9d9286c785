"""batch_norm: closed form in train and eval mode, running statistics, gradient checks."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.gradcheck import check_gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_forward_and_running_update(device, shape, dtype):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    running_mean, running_var = rng.standard_normal(3).astype(np.float32), (rng.random(3) + 0.5).astype(np.float32)
    rm, rv = xp.array(running_mean), xp.array(running_var)  # copies: updated in place
    out = F.batch_norm(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), rm, rv, training=True)
    axes = (0,) + tuple(range(2, len(shape)))
    bshape = (1, 3) + (1,) * (len(shape) - 2)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    expected = (x64 - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5) * gamma.reshape(bshape) \
        + beta.reshape(bshape)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=tol, atol=tol)
    count = x.size // 3
    np.testing.assert_allclose(backend.to_numpy(rm), 0.9 * running_mean + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(rv), 0.9 * running_var + 0.1 * var * count / (count - 1), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_uses_running_stats_and_leaves_them(device):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    rm_d, rv_d = xp.asarray(rm), xp.asarray(rv)
    out = F.batch_norm(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), rm_d, rv_d, training=False)
    b = (1, 3, 1, 1)
    expected = (x - rm.reshape(b)) / np.sqrt(rv.reshape(b) + 1e-5) * gamma.reshape(b) + beta.reshape(b)
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(rm_d), rm)
    np.testing.assert_array_equal(backend.to_numpy(rv_d), rv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 2, 3, 2), (5, 2)])
def test_gradcheck(device, training, shape):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal(shape))
    gamma, beta = xp.asarray(rng.standard_normal(2)), xp.asarray(rng.standard_normal(2))

    def fn(a, g, b):  # fresh running stats each call, so repeated evaluations see the same state
        return F.batch_norm(a, g, b, xp.zeros(2), xp.ones(2) * 1.5, training=training)

    check_gradients(fn, [x, gamma, beta])


def test_gradcheck_large_random_direction():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 10, 10))
    check_gradients(lambda a, g, b: F.batch_norm(a, g, b, None, None, training=True),
                    [x, rng.standard_normal(6), rng.standard_normal(6)])


def test_node_does_not_pin_running_buffers():
    x = Tensor(np.random.default_rng(4).standard_normal((2, 2, 3, 3)), requires_grad=True)
    out = F.batch_norm(x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), training=True)
    assert out._creator.running_mean is None and out._creator.running_var is None


def test_batch_norm_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x, gamma, beta = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal(3), rng.standard_normal(3)
    g = rng.standard_normal(x.shape)
    rm, rv = np.zeros(3), np.ones(3)
    ts = [Tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    F.batch_norm(*ts, rm, rv, training=True).backward(g)
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    tt = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    torch.nn.functional.batch_norm(tt[0], trm, trv, tt[1], tt[2], True, 0.1, 1e-5).backward(torch.tensor(g))
    for mine, ref in zip(ts, tt):
        np.testing.assert_allclose(mine.grad, ref.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)
