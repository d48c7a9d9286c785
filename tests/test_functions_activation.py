"""relu, sigmoid, softmax, log_softmax: closed forms, stability, gradient checks."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.gradcheck import check_gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_values(device, dtype):
    xp = backend.parse_device(device).xp
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(dtype)
    a = xp.asarray(x)
    for fn, expected in [(F.relu, np.maximum(x, 0)), (F.sigmoid, 1 / (1 + np.exp(-x.astype(np.float64))))]:
        out = fn(a)
        assert out.dtype == dtype
        np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-6, atol=1e-7)
    e = np.exp(x.astype(np.float64))
    soft = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(backend.to_numpy(F.softmax(a).data), soft, rtol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(F.log_softmax(a, axis=2).data),
                               np.log(e / e.sum(axis=2, keepdims=True)), rtol=1e-5, atol=1e-6)


def test_extreme_values_do_not_overflow():
    x = np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(F.sigmoid(x).data, [[0.0, 0.5, 1.0]])
        np.testing.assert_allclose(F.softmax(x).data, [[0.0, 0.0, 1.0]])
        np.testing.assert_allclose(F.log_softmax(x).data, [[-2000.0, -1000.0, 0.0]])


@pytest.mark.parametrize("device", DEVICES)
def test_gradchecks(device):
    xp = backend.parse_device(device).xp
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    x[np.abs(x) < 0.05] = 0.3  # keep relu away from its kink
    a = xp.asarray(x)
    check_gradients(F.relu, [a])
    check_gradients(F.sigmoid, [a])
    check_gradients(lambda t: F.softmax(t, axis=1), [a])
    check_gradients(lambda t: F.log_softmax(t, axis=1), [a])
    check_gradients(lambda t: F.softmax(t, axis=-1), [a])
    check_gradients(lambda t: F.log_softmax(t, axis=0), [a])


def test_large_tensor_random_direction():
    x = np.random.default_rng(2).standard_normal((4, 5, 16, 16))
    check_gradients(lambda t: F.log_softmax(F.sigmoid(t) * 3.0, axis=1), [x])
