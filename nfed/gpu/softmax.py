"""Softmax, log-softmax and softmax cross-entropy along the class axis 1 of [N, K, ...] CuPy arrays
(kernels/softmax_ce.cu): one pass per pixel, no host synchronisation; PyTorch's semantics for class
weights, ignore_index and the reductions. Other axes are backend.Unsupported."""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels


def _class_layout(x, axis: int):
    if axis not in (1, -x.ndim + 1) or x.ndim < 2:
        raise backend.Unsupported("GPU softmax works along axis 1 of [N, K, ...] arrays")
    n, k = x.shape[0], x.shape[1]
    return n, k, int(np.prod(x.shape[2:], dtype=np.int64))


def softmax(x, axis=1, log=False):
    """softmax (or log_softmax when log) along the class axis 1."""
    cp = backend.cupy_module()
    x = kernels.contiguous(x)
    n, k, hw = _class_layout(x, axis)
    y = cp.empty_like(x)
    if x.size:
        dev = kernels.device_index(x)
        kernels.launch(f"softmax_NKHW_{kernels.dtype_suffix(x.dtype)}", kernels.grid_1d(n * hw, dev),
                       (x, y, n, k, hw, int(bool(log))), dev)
    return y


def log_softmax(x, axis=1):
    return softmax(x, axis, log=True)


def softmax_backward(grad_output, y, axis=1, log=False):
    """Gradient of softmax (log_softmax when log) from its OUTPUT y."""
    cp = backend.cupy_module()
    gy, y = kernels.contiguous(grad_output), kernels.contiguous(y)
    n, k, hw = _class_layout(y, axis)
    gx = cp.empty_like(y)
    if y.size:
        dev = kernels.device_index(y)
        kernels.launch(f"softmax_backward_NKHW_{kernels.dtype_suffix(y.dtype)}", kernels.grid_1d(n * hw, dev),
                       (y, gy, gx, n, k, hw, int(bool(log))), dev)
    return gx


def log_softmax_backward(grad_output, y, axis=1):
    """Gradient of log_softmax from its OUTPUT y."""
    return softmax_backward(grad_output, y, axis, log=True)


def _ce_inputs(logits, target, weight):
    cp = backend.cupy_module()
    logits = kernels.contiguous(logits)
    n, k, hw = _class_layout(logits, 1)
    target = kernels.contiguous(cp.asarray(target).astype(np.int64, copy=False))
    if target.size != n * hw:
        raise ValueError(f"cross_entropy: target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)}")
    if weight is None:
        weight = cp.ones(k, dtype=logits.dtype)
    weight = kernels.contiguous(cp.asarray(weight).astype(logits.dtype, copy=False))
    if weight.shape != (k,):
        raise ValueError(f"cross_entropy: weight must have {k} entries, got shape {tuple(weight.shape)}")
    return logits, target, weight, n, k, hw


def cross_entropy_forward(logits, target, weight=None, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy (PyTorch semantics) -> (loss, denominator).

    reduction mean: loss = sum w[t] * nll / sum w[t] over non-ignored pixels (denominator = that sum);
    sum: denominator 1; none: per-pixel losses shaped like target. All on the device, no host sync.
    """
    cp = backend.cupy_module()
    logits, target, weight, n, k, hw = _ce_inputs(logits, target, weight)
    loss = cp.empty(n * hw, dtype=logits.dtype)
    pixel_weight = cp.empty(n * hw, dtype=logits.dtype)
    if loss.size:
        dev = kernels.device_index(logits)
        kernels.launch(f"softmax_cross_entropy_forward_NKHW_{kernels.dtype_suffix(logits.dtype)}",
                       kernels.grid_1d(n * hw, dev),
                       (logits, target, weight, ignore_index, n, k, hw, loss, pixel_weight), dev)
    if reduction == "none":
        return loss.reshape(target.shape), None
    if reduction == "sum":
        return loss.sum(), None
    if reduction == "mean":
        denominator = pixel_weight.sum()
        return loss.sum() / denominator, denominator
    raise ValueError(f"cross_entropy: bad reduction '{reduction}' (use mean, sum or none)")


def cross_entropy_backward(grad_output, logits, target, weight=None, ignore_index=-100, reduction="mean",
                           denominator=None):
    """Gradient of cross_entropy_forward with respect to the logits (grad_output stays on the device)."""
    cp = backend.cupy_module()
    logits, target, weight, n, k, hw = _ce_inputs(logits, target, weight)
    gy = cp.asarray(grad_output, dtype=logits.dtype)
    per_pixel = reduction == "none"
    if per_pixel:
        scale = kernels.contiguous(gy.reshape(-1))
    elif reduction == "mean":
        if denominator is None:
            raise ValueError("cross_entropy_backward: reduction 'mean' needs the forward's denominator")
        scale = (gy / denominator).reshape(1)
    else:
        scale = gy.reshape(1)
    scale = kernels.contiguous(scale.astype(logits.dtype, copy=False))
    gx = cp.empty_like(logits)
    if gx.size:
        dev = kernels.device_index(logits)
        kernels.launch(f"softmax_cross_entropy_backward_NKHW_{kernels.dtype_suffix(logits.dtype)}",
                       kernels.grid_1d(n * hw, dev),
                       (logits, target, weight, ignore_index, scale, int(per_pixel), n, k, hw, gx), dev)
    return gx


