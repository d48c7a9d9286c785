"""Losses: pixel-wise cross-entropy, mean squared error, binary cross-entropy with logits, soft Dice.

Cross-entropy on CuPy logits runs nfed.gpu.softmax's fused softmax cross-entropy kernels (one pass forward,
one backward, no log-probabilities kept) after the same target checks as on the CPU."""
from __future__ import annotations

import contextlib

from nfed.common import backend
from nfed.core.autograd import Function, Tensor
from nfed.core.functions.activation import log_softmax_array, sigmoid
from nfed.core.functions.reduction import sum as tensor_sum
from nfed.core.functions.utils import raw

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(values, reduction: str):
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _reduce_grad(g, count: int, reduction: str):
    """The upstream gradient per element: g itself ("none"), or the 0-d g (/ count for "mean"),
    which broadcasts against the element-wise gradient."""
    return g / count if reduction == "mean" else g


class CrossEntropy(Function):
    def __init__(self, target, weight, ignore_index: int, reduction: str):
        self.target = target
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits):
        xp = backend.array_module(logits)
        target = xp.asarray(self.target)
        self.target = None
        n, k = logits.shape[:2]
        if target.shape != (n,) + logits.shape[2:]:
            raise ValueError(f"cross_entropy: target shape {target.shape} does not match logits {logits.shape} "
                             "(expected [N, *spatial])")
        valid = target != self.ignore_index
        safe = xp.where(valid, target, 0).astype(xp.int64)
        if bool(((safe < 0) | (safe >= k)).any()):
            raise ValueError(f"cross_entropy: target values must lie in [0, {k - 1}] or equal ignore_index")
        self.gpu = None
        if backend.is_gpu_array(logits):
            from nfed.gpu import softmax as gpu_softmax  # noqa: PLC0415 - GPU only: importing nfed never loads CuPy

            with contextlib.suppress(backend.Unsupported):
                out, denom = gpu_softmax.cross_entropy_forward(logits, target, self.weight, self.ignore_index,
                                                               self.reduction)
                if self.recording:
                    self.gpu, self.logits, self.gpu_target, self.denom = gpu_softmax, logits, target, denom
                return out
        logp = log_softmax_array(logits, 1)
        picked = xp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
        if self.weight is None:
            wt = valid.astype(logits.dtype)
        else:
            wt = xp.asarray(self.weight, dtype=logits.dtype)[safe] * valid
        losses = -picked * wt
        denom = wt.sum()
        if self.reduction == "mean":
            out = losses.sum() / denom  # PyTorch: divide by the summed weights of non-ignored targets
        elif self.reduction == "sum":
            out = losses.sum()
        else:
            out = losses
        if self.recording:
            self.logp, self.safe, self.wt, self.denom = logp, safe, wt, denom
        return xp.asarray(out, dtype=logits.dtype)

    def backward(self, g):
        if self.gpu is not None:
            return self.gpu.cross_entropy_backward(g, self.logits, self.gpu_target, self.weight, self.ignore_index,
                                                   self.reduction, self.denom)
        xp = backend.array_module(g)
        grad = xp.exp(self.logp)
        k = grad.shape[1]
        classes = xp.arange(k).reshape((1, k) + (1,) * (grad.ndim - 2))
        grad -= classes == self.safe[:, None]
        coef = self.wt * (g / self.denom if self.reduction == "mean" else g)
        grad *= coef[:, None]
        return grad


def cross_entropy(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    """Softmax cross-entropy per pixel like torch.nn.functional.cross_entropy.

    logits [N, K, *spatial] (or [N, K]); target integer class indices [N, *spatial]; `weight` [K] class
    weights; pixels equal to `ignore_index` contribute nothing; "mean" divides by the summed weights of the
    non-ignored pixels (NaN when every pixel is ignored, as in PyTorch).
    """
    _check_reduction(reduction)
    return CrossEntropy(raw(target), None if weight is None else raw(weight), ignore_index, reduction)(logits)


class MSE(Function):
    def __init__(self, reduction: str):
        self.reduction = reduction

    def forward(self, a, b):
        diff = a - b
        if self.recording:
            self.diff = diff
        return backend.array_module(diff).asarray(_reduce(diff * diff, self.reduction))

    def backward(self, g):
        diff = self.diff
        grad = diff * (2 * _reduce_grad(g, diff.size, self.reduction))
        return (grad if self.needs_input_grad[0] else None,
                -grad if self.needs_input_grad[1] else None)


def mse_loss(a, b, reduction: str = "mean"):
    """Mean (or sum, or element-wise) squared difference; both inputs may require grad."""
    _check_reduction(reduction)
    return MSE(reduction)(a, b)


def _softplus(xp, x):
    """log(1 + exp(x)) without overflow."""
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


class BCEWithLogits(Function):
    def __init__(self, pos_weight, reduction: str):
        self.pos_weight = pos_weight
        self.reduction = reduction

    def forward(self, x, t):
        xp = backend.array_module(x)
        sp = _softplus(xp, x)  # -log(1 - sigmoid(x)); -log(sigmoid(x)) = sp - x
        if self.pos_weight is None:
            losses = sp - t * x
        else:
            pw = xp.asarray(self.pos_weight, dtype=x.dtype)
            losses = (1 - t) * sp + pw * t * (sp - x)
        if self.recording:
            self.x, self.t = x, t
        return xp.asarray(_reduce(losses, self.reduction), dtype=x.dtype)

    def backward(self, g):
        xp = backend.array_module(g)
        x, t = self.x, self.t
        scale = _reduce_grad(g, x.size, self.reduction)
        s = 0.5 * (1 + xp.tanh(0.5 * x))  # sigmoid(x), stable
        pw = None if self.pos_weight is None else xp.asarray(self.pos_weight, dtype=x.dtype)
        gx = gt = None
        if self.needs_input_grad[0]:
            gx = (s - t) if pw is None else (1 - t) * s - pw * t * (1 - s)
            gx = gx * scale
        if self.needs_input_grad[1]:
            sp = _softplus(xp, x)
            gt = -x if pw is None else -sp + pw * (sp - x)
            gt = gt * scale
        return gx, gt


def bce_with_logits(logits, target, pos_weight=None, reduction: str = "mean"):
    """Binary cross-entropy on logits like torch.nn.functional.binary_cross_entropy_with_logits
    (stable for any logit); `pos_weight` scales the positive term."""
    _check_reduction(reduction)
    if not isinstance(target, Tensor):
        xp = backend.array_module(raw(logits))
        target = xp.asarray(target, dtype=raw(logits).dtype)
    return BCEWithLogits(None if pos_weight is None else raw(pos_weight), reduction)(logits, target)


def soft_dice_loss(logits, target, eps: float = 1.0):
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) with p = sigmoid(logits), pooled over the batch.

    Binary: logits [N, 1, H, W] or [N, H, W]; target [N, H, W] (or the logits' shape) with 0/1 values
    (integer or boolean masks count every value > 0 as change; float targets are used as given).
    """
    logits_raw = raw(logits)
    xp = backend.array_module(logits_raw)
    t = xp.asarray(raw(target))
    if t.dtype.kind in "biu":
        t = t > 0
    t = t.astype(logits_raw.dtype)
    if t.shape != logits_raw.shape:
        if logits_raw.ndim == 4 and logits_raw.shape[1] == 1 and t.shape == logits_raw.shape[:1] + logits_raw.shape[2:]:
            t = t[:, None]
        else:
            raise ValueError(f"soft_dice_loss: target shape {t.shape} does not match logits {logits_raw.shape}")
    p = sigmoid(logits)
    intersection = tensor_sum(p * t)
    total = tensor_sum(p) + float(t.sum())
    return 1.0 - (2.0 * intersection + eps) / (total + eps)
