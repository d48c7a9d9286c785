"""Batch normalisation on CuPy arrays (kernels/batchnorm.cu), optionally fused with the following ReLU.

batch_norm_forward/backward (with relu=True) are the GPU counterpart of the CPU's fused conv -> batch norm
-> ReLU (nfed.core.functions.fused): one pass applies normalisation and ReLU, and backward recomputes the
ReLU mask from x, so neither the normalised values nor the ReLU output are kept. The batch_norm_train_* /
batch_norm_eval_* functions have the signatures of nfed.core.functions.normalization.
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels


def _bn_layout(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, int(np.prod(x.shape[2:], dtype=np.int64))


def _bn_vector(v, dtype):
    return kernels.contiguous(v.astype(dtype, copy=False))


def _bn_batch_stats(x, running_mean=None, running_var=None, momentum=0.1, eps=1e-5):
    """(mean, biased var, invstd) of x per channel; running statistics updated in place when given."""
    cp = backend.cupy_module()
    n, c, hw = _bn_layout(x)
    dev = kernels.device_index(x)
    suffix = kernels.dtype_suffix(x.dtype)
    splits = kernels.channel_splits(n * hw, c, dev)
    partial = cp.empty((c, splits, 2), dtype=x.dtype)
    kernels.launch(f"bn_partial_sums_NCHW_{suffix}", (splits, c), (x, n, c, hw, partial), dev)
    mean, var, invstd = (cp.empty(c, dtype=x.dtype) for _ in range(3))
    update = running_mean is not None and running_var is not None
    if update:
        for r in (running_mean, running_var):
            if r.dtype != x.dtype or not r.flags.c_contiguous or r.shape != (c,):
                raise backend.Unsupported("running statistics are not contiguous vectors of the input's dtype")
    kernels.launch(f"bn_finalize_stats_{suffix}", kernels.grid_1d(c, dev),
                   (partial, x, c, splits, hw, n * hw, momentum, eps, int(update),
                    running_mean if update else None, running_var if update else None, mean, var, invstd), dev)
    return mean, var, invstd


def _bn_apply(x, mean, invstd, gamma, beta, relu=False, want_xhat=False):
    cp = backend.cupy_module()
    n, c, hw = _bn_layout(x)
    y = cp.empty_like(x)
    xhat = cp.empty_like(x) if want_xhat else None
    kernels.launch(f"bn_forward_apply_NCHW_{kernels.dtype_suffix(x.dtype)}", kernels.grid_planes(n * c, hw),
                   (x, mean, invstd, _bn_vector(gamma, x.dtype), _bn_vector(beta, x.dtype), y, xhat, n, c, hw,
                    int(bool(relu))), kernels.device_index(x))
    return y, xhat


def _bn_backward(gy, saved, mean, invstd, gamma, beta, training, relu, saved_is_xhat):
    """(dx, dgamma, dbeta); `saved` is x (or xhat when saved_is_xhat)."""
    cp = backend.cupy_module()
    gy, saved = kernels.contiguous(gy), kernels.contiguous(saved)
    n, c, hw = _bn_layout(saved)
    dev = kernels.device_index(saved)
    suffix = kernels.dtype_suffix(saved.dtype)
    gamma = _bn_vector(gamma, saved.dtype)
    beta = gamma if beta is None else _bn_vector(beta, saved.dtype)  # beta only shapes the ReLU mask
    mean = gamma if mean is None else _bn_vector(mean, saved.dtype)  # unused when saved is xhat
    invstd = _bn_vector(invstd, saved.dtype)
    splits = kernels.channel_splits(n * hw, c, dev)
    partial = cp.empty((c, splits, 2), dtype=saved.dtype)
    flags = (int(bool(relu)), int(bool(saved_is_xhat)))
    kernels.launch(f"bn_backward_partial_sums_NCHW_{suffix}", (splits, c),
                   (gy, saved, mean, invstd, gamma, beta, n, c, hw) + flags + (partial,), dev)
    sums = cp.ascontiguousarray(partial.sum(axis=1))  # [C, 2] = (sum g, sum g * xhat)
    gx = cp.empty_like(saved)
    kernels.launch(f"bn_backward_apply_NCHW_{suffix}", kernels.grid_planes(n * c, hw),
                   (gy, saved, mean, invstd, gamma, beta, sums, n, c, hw) + flags + (int(bool(training)), gx), dev)
    return gx, sums[:, 1].copy(), sums[:, 0].copy()


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                       relu=False):
    """Batch norm over N, H, W, optionally fused with the following ReLU -> (y, mean, invstd).

    Training uses the batch statistics and updates running_mean/running_var IN PLACE (unbiased variance,
    PyTorch semantics); eval uses the running statistics. Backward needs x, mean and invstd only: the
    ReLU mask is recomputed from x, so neither the normalised values nor the ReLU output are kept.
    """
    cp = backend.cupy_module()
    x = kernels.contiguous(x)
    if training:
        mean, _, invstd = _bn_batch_stats(x, running_mean, running_var, momentum, eps)
    else:
        mean = _bn_vector(running_mean, x.dtype)
        invstd = 1.0 / cp.sqrt(running_var.astype(x.dtype, copy=False) + x.dtype.type(eps))
    y, _ = _bn_apply(x, mean, invstd, gamma, beta, relu=relu)
    return y, mean, invstd


def batch_norm_backward(grad_output, x, gamma, beta, mean, invstd, training, relu=False):
    """-> (grad_x, grad_gamma, grad_beta) of batch_norm_forward (same relu flag)."""
    return _bn_backward(grad_output, x, mean, invstd, gamma, beta, training, relu, saved_is_xhat=False)


# The CPU module's raw functions (nfed.core.functions.normalization), same signatures and results:

def batch_norm_train_forward(x, gamma, beta, eps=1e-5):
    """(y, xhat, mean, var, invstd) with batch statistics (biased var), like the CPU function."""
    x = kernels.contiguous(x)
    mean, var, invstd = _bn_batch_stats(x, eps=eps)
    y, xhat = _bn_apply(x, mean, invstd, gamma, beta, want_xhat=True)
    return y, xhat, mean, var, invstd


def batch_norm_train_backward(gout, xhat, gamma, invstd):
    """(dx, dgamma, dbeta) of the training-mode forward, from the saved xhat."""
    return _bn_backward(gout, xhat, None, invstd, gamma, None, True, False, saved_is_xhat=True)


def batch_norm_eval_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta."""
    y, _, _ = batch_norm_forward(x, gamma, beta, running_mean, running_var, False, eps=eps)
    return y


def batch_norm_eval_backward(g, x, gamma, mean, invstd):
    """(dx, dgamma, dbeta) of the evaluation-mode forward (fixed statistics)."""
    return _bn_backward(g, x, mean, invstd, gamma, None, False, False, saved_is_xhat=False)


