"""Losses: cross-entropy (weights, ignore_index), MSE, BCE with logits, soft Dice."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.gradcheck import check_gradients


def ce_oracle(logits, target, weight, ignore_index, reduction):
    """Per-pixel loops: -w[t] * log softmax(logits)[t], PyTorch's weighted mean."""
    n, k = logits.shape[:2]
    flat = np.moveaxis(logits, 1, -1).reshape(-1, k)
    t = target.reshape(-1)
    losses, weights = np.zeros(len(t)), np.zeros(len(t))
    for i, (row, cls) in enumerate(zip(flat, t)):
        if cls == ignore_index:
            continue
        wt = 1.0 if weight is None else weight[cls]
        losses[i] = -wt * (row[cls] - np.log(np.exp(row - row.max()).sum()) - row.max())
        weights[i] = wt
    if reduction == "mean":
        return losses.sum() / weights.sum()
    if reduction == "sum":
        return losses.sum()
    return losses.reshape(target.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("spatial", [True, False])
def test_cross_entropy_forward_and_gradcheck(device, reduction, weighted, spatial):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(0)
    shape = (2, 3, 3, 4) if spatial else (5, 3)
    logits = rng.standard_normal(shape) * 3
    target = rng.integers(0, 3, (shape[0],) + shape[2:])
    target.reshape(-1)[::4] = 255  # ignored pixels
    weight = np.array([0.2, 1.0, 3.0]) if weighted else None
    wd = None if weight is None else xp.asarray(weight)
    out = F.cross_entropy(xp.asarray(logits), xp.asarray(target), wd, ignore_index=255, reduction=reduction)
    np.testing.assert_allclose(backend.to_numpy(out.data), ce_oracle(logits, target, weight, 255, reduction),
                               rtol=1e-12, atol=1e-12)
    check_gradients(lambda t: F.cross_entropy(t, xp.asarray(target), wd, ignore_index=255, reduction=reduction),
                    [xp.asarray(logits)])


def test_cross_entropy_float32_and_bad_targets():
    rng = np.random.default_rng(1)
    logits = Tensor(rng.standard_normal((2, 2, 4, 4)).astype(np.float32), requires_grad=True)
    target = rng.integers(0, 2, (2, 4, 4))
    loss = F.cross_entropy(logits, target)
    assert loss.dtype == np.float32
    loss.backward()
    assert logits.grad.dtype == np.float32
    with pytest.raises(ValueError, match="target values"):
        F.cross_entropy(logits, np.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match="target shape"):
        F.cross_entropy(logits, np.zeros((2, 4, 5), dtype=np.int64))


def test_cross_entropy_all_ignored_is_nan_like_pytorch():
    with np.errstate(invalid="ignore"):
        loss = F.cross_entropy(np.zeros((1, 2, 2, 2)), np.full((1, 2, 2), -100))
    assert np.isnan(loss.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse(device, reduction):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    out = F.mse_loss(xp.asarray(a), xp.asarray(b), reduction=reduction)
    sq = (a - b) ** 2
    expected = {"mean": sq.mean(), "sum": sq.sum(), "none": sq}[reduction]
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-12)
    check_gradients(lambda p, q: F.mse_loss(p, q, reduction=reduction), [xp.asarray(a), xp.asarray(b)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits(device, pos_weight, reduction):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((2, 1, 3, 3)) * 4, rng.random((2, 1, 3, 3))
    pw = None if pos_weight is None else xp.asarray([pos_weight])
    out = F.bce_with_logits(xp.asarray(x), xp.asarray(t), pw, reduction=reduction)
    p = 1 / (1 + np.exp(-x))
    w = 1.0 if pos_weight is None else pos_weight
    losses = -(w * t * np.log(p) + (1 - t) * np.log(1 - p))
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-10)
    check_gradients(lambda a, b: F.bce_with_logits(a, b, pw, reduction=reduction), [xp.asarray(x), xp.asarray(t)])


def test_bce_with_logits_is_stable_for_huge_logits():
    with np.errstate(over="raise", invalid="raise"):
        x = Tensor(np.array([-1e4, 1e4], dtype=np.float32), requires_grad=True)
        loss = F.bce_with_logits(x, np.array([1.0, 0.0], dtype=np.float32), reduction="sum")
        loss.backward()
    np.testing.assert_allclose(loss.item(), 2e4, rtol=1e-6)
    np.testing.assert_allclose(x.grad, [-1.0, 1.0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channel_dim", [True, False])
def test_soft_dice(device, channel_dim):
    xp = backend.parse_device(device).xp
    rng = np.random.default_rng(4)
    shape = (2, 1, 4, 4) if channel_dim else (2, 4, 4)
    x = rng.standard_normal(shape)
    mask = rng.integers(0, 3, (2, 4, 4))  # change-type values: > 0 counts as change
    out = F.soft_dice_loss(xp.asarray(x), xp.asarray(mask), eps=1.0)
    p = (1 / (1 + np.exp(-x))).reshape(2, 4, 4)
    t = (mask > 0).astype(float)
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-12)
    check_gradients(lambda a: F.soft_dice_loss(a, xp.asarray(mask)), [xp.asarray(x)])


def test_losses_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits, target = rng.standard_normal((2, 4, 3, 3)), rng.integers(0, 4, (2, 3, 3))
    target[0, 0, 0] = -100
    weight = rng.random(4) + 0.1
    mine = Tensor(logits, requires_grad=True)
    F.cross_entropy(mine, target, weight).backward()
    ref = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(ref, torch.tensor(target), torch.tensor(weight)).backward()
    np.testing.assert_allclose(mine.grad, ref.grad.numpy(), rtol=1e-10, atol=1e-12)
