"""max_pool2d: naive-loop oracle, tie handling, gradient checks."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.gradcheck import check_gradients


def max_pool_oracle(x, k, s):
    n, c, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    out = np.empty((n, c, ho, wo), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            out[:, :, i, j] = x[:, :, i * s:i * s + k, j * s:j * s + k].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 5)])  # odd sizes: trailing row/column dropped
@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), (3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_forward_matches_loops(device, shape, kernel, stride, dtype):
    xp = backend.parse_device(device).xp
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    out = F.max_pool2d(xp.asarray(x), kernel, stride)
    assert out.dtype == dtype
    np.testing.assert_array_equal(backend.to_numpy(out.data), max_pool_oracle(x, kernel, stride or kernel))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), (3, 1)])
def test_max_pool_gradcheck(device, kernel, stride):
    xp = backend.parse_device(device).xp
    # distinct values (a permutation) so no window has a tie that finite differences would straddle
    x = np.random.default_rng(1).permutation(2 * 2 * 7 * 6).reshape(2, 2, 7, 6) * 0.1
    check_gradients(lambda t: F.max_pool2d(t, kernel, stride), [xp.asarray(x)], eps=1e-4)


def test_ties_send_the_gradient_to_the_first_maximum():
    x = Tensor(np.ones((1, 1, 2, 2)), requires_grad=True)
    F.max_pool2d(x).sum().backward()
    np.testing.assert_array_equal(x.grad[0, 0], [[1, 0], [0, 0]])
    x = Tensor(np.array([[[[0.0, 1.0], [1.0, 1.0]]]]), requires_grad=True)
    F.max_pool2d(x).sum().backward()
    np.testing.assert_array_equal(x.grad[0, 0], [[0, 1], [0, 0]])


def test_max_pool_against_torch():
    torch = pytest.importorskip("torch")
    x = np.round(np.random.default_rng(2).standard_normal((2, 3, 8, 8)), 1)  # rounding creates ties
    g = np.random.default_rng(3).standard_normal((2, 3, 4, 4))
    t = Tensor(x, requires_grad=True)
    F.max_pool2d(t).backward(g)
    tt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tt, 2).backward(torch.tensor(g))
    np.testing.assert_array_equal(t.grad, tt.grad.numpy())
