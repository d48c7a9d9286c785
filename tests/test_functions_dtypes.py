"""Every op in float32 and float64: float32 stays float32 (values and gradients) and agrees with float64."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.core import functions as F
from nfed.core.autograd import Tensor

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 6, 6))
Y = RNG.standard_normal((2, 4, 6, 6))
W3 = RNG.standard_normal((3, 4, 3, 3)) * 0.3
WT = RNG.standard_normal((4, 3, 2, 2)) * 0.3
B3 = RNG.standard_normal(3)
G4, BE4 = RNG.random(4) + 0.5, RNG.standard_normal(4)
TARGET = RNG.integers(0, 4, (2, 6, 6))
MASK = RNG.integers(0, 2, (2, 6, 6))

# name -> (function of float tensors, the float inputs)
OPS = {
    "add": (lambda a, b: a + b, [X, Y]),
    "sub": (lambda a, b: a - b[:, :1], [X, Y]),
    "mul": (lambda a, b: a * b, [X, Y]),
    "div": (lambda a, b: a / (b * b + 1.0), [X, Y]),
    "neg_pow_exp_log": (lambda a: F.log(F.exp(-a) + a ** 2), [X]),
    "sum_mean_reshape": (lambda a: F.reshape(F.sum(a, axis=1), 2, -1) * F.mean(a), [X]),
    "concat_getitem": (lambda a, b: F.concat([a, b[:, 1:3]], axis=1), [X, Y]),
    "conv2d": (lambda a, w, b: F.conv2d(a, w, b, 1, 1), [X, W3, B3]),
    "conv2d_1x1": (lambda a, w: F.conv2d(a, w[:, :, 1:2, 1:2]), [X, W3]),
    "conv_transpose2d": (lambda a, w: F.conv_transpose2d(a, w), [X, WT]),
    "max_pool2d": (lambda a: F.max_pool2d(a), [X]),
    "relu_sigmoid": (lambda a: F.sigmoid(F.relu(a)), [X]),
    "softmax": (lambda a: F.softmax(a, axis=1), [X]),
    "log_softmax": (lambda a: F.log_softmax(a, axis=1), [X]),
    "batch_norm_train": (lambda a, g, b: F.batch_norm(a, g, b, None, None, training=True), [X, G4, BE4]),
    "batch_norm_eval": (lambda a, g, b: F.batch_norm(a, g, b, np.zeros(4), np.full(4, 2.0), training=False),
                        [X, G4, BE4]),
    "cross_entropy": (lambda a: F.cross_entropy(a, TARGET, weight=np.array([1.0, 2.0, 0.5, 1.0])), [X]),
    "mse_loss": (lambda a, b: F.mse_loss(a, b), [X, Y]),
    "bce_with_logits": (lambda a, b: F.bce_with_logits(a, F.sigmoid(b).data), [X, Y]),
    "soft_dice_loss": (lambda a: F.soft_dice_loss(a[:, :1], MASK), [X]),
}


def _run(fn, arrays, dtype):
    tensors = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    projection = np.cos(np.arange(out.data.size)).reshape(out.shape).astype(dtype)
    out.backward(projection)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_and_float64(name, incoming_grad_dtypes):
    fn, arrays = OPS[name]
    out64, grads64 = _run(fn, arrays, np.float64)
    out32, grads32 = _run(fn, arrays, np.float32)
    assert incoming_grad_dtypes and all(leaf == grad for leaf, grad in incoming_grad_dtypes), incoming_grad_dtypes
    assert out64.dtype == np.float64 and out32.dtype == np.float32
    np.testing.assert_allclose(out32.data, out64.data, rtol=1e-4, atol=1e-5)
    for g32, g64 in zip(grads32, grads64):
        if g64 is None:  # an input the op does not differentiate
            assert g32 is None
            continue
        assert g32.dtype == np.float32 and g64.dtype == np.float64
        np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(g64).max()))
