"""Batch normalisation over [N, C] or [N, C, *spatial] inputs (PyTorch semantics).

Training: normalise with the batch statistics (biased variance) and update the running statistics in
place with momentum, using the unbiased variance, as PyTorch does. Evaluation: use the running statistics.
The raw-array functions hand CuPy arrays to nfed.gpu.batchnorm (nfed.core.dispatch).
"""
from __future__ import annotations

from nfed.common import backend
from nfed.core.autograd import Function, Tensor
from nfed.core.dispatch import gpu_implementation
from nfed.core.functions.layout import ChannelView


def _gpu_batchnorm():
    from nfed.gpu import batchnorm  # noqa: PLC0415 - at the first CuPy call: importing nfed loads no CuPy

    return batchnorm


@gpu_implementation(lambda: _gpu_batchnorm().batch_norm_train_forward)
def batch_norm_train_forward(x, gamma, beta, eps=1e-5):
    """(y, xhat, mean, var, invstd) with batch statistics; xhat and invstd are what backward needs.
    y and xhat have x's layout (channels-last stays channels-last, see layout.ChannelView)."""
    xp = backend.array_module(x)
    channels = ChannelView(x)
    x2 = channels.view(x)
    count = x.size // x.shape[1]
    mean = channels.sums(x2) / count
    xhat = x2 - channels.per_channel(mean)
    var = channels.sums(xp.square(xhat)) / count
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat *= channels.per_channel(invstd)
    y = xhat * channels.per_channel(gamma)
    y += channels.per_channel(beta)
    return channels.wrap(y), channels.wrap(xhat), mean, var, invstd


@gpu_implementation(lambda: _gpu_batchnorm().batch_norm_train_backward)
def batch_norm_train_backward(gout, xhat, gamma, invstd):
    """(dx, dgamma, dbeta) for the training-mode forward (statistics depend on x); dx has xhat's layout."""
    channels = ChannelView(xhat)
    g2, xhat2 = channels.view(gout), channels.view(xhat)
    count = gout.size // gout.shape[1]
    dbeta = channels.sums(g2)
    dgamma = channels.sums(g2 * xhat2)
    # dx = gamma*invstd * (g - mean(g) - xhat * mean(g * xhat))
    dx = xhat2 * channels.per_channel(dgamma / count)
    backend.array_module(gout).subtract(g2, dx, out=dx)
    dx -= channels.per_channel(dbeta / count)
    dx *= channels.per_channel(gamma * invstd)
    return channels.wrap(dx), dgamma, dbeta


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch (unbiased variance)."""
    unbiased = var * (count / max(count - 1, 1))
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * unbiased


@gpu_implementation(lambda: _gpu_batchnorm().batch_norm_eval_forward)
def batch_norm_eval_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta."""
    xp = backend.array_module(x)
    invstd = (1.0 / xp.sqrt(running_var + eps)).astype(x.dtype)
    scale = gamma * invstd
    shift = beta - running_mean.astype(x.dtype) * scale
    channels = ChannelView(x)
    y = channels.view(x) * channels.per_channel(scale)
    y += channels.per_channel(shift)
    return channels.wrap(y)


class BatchNorm(Function):
    def __init__(self, running_mean, running_var, training: bool, momentum: float, eps: float):
        self.running_mean = running_mean
        self.running_var = running_var
        self.training = training
        self.momentum = momentum
        self.eps = eps

    def forward(self, x, gamma, beta):
        if x.ndim < 2:
            raise ValueError(f"batch_norm: input must be [N, C, ...], got shape {x.shape}")
        if self.training:
            y, xhat, mean, var, invstd = batch_norm_train_forward(x, gamma, beta, self.eps)
            if self.running_mean is not None:
                count = x.size // x.shape[1]
                update_running_stats(self.running_mean, self.running_var, mean, var, count, self.momentum)
            if self.recording:
                self.xhat, self.gamma, self.invstd = xhat, gamma, invstd
        else:
            y = batch_norm_eval_forward(x, gamma, beta, self.running_mean, self.running_var, self.eps)
            if self.recording:  # copies of the (tiny) statistics: the buffers may change before backward
                xp = backend.array_module(x)
                self.x, self.gamma = x, gamma
                self.mean = self.running_mean.astype(x.dtype)
                self.invstd = (1.0 / xp.sqrt(self.running_var + self.eps)).astype(x.dtype)
        self.running_mean = self.running_var = None  # the node must not pin the module's buffers
        return y

    def backward(self, g):
        if self.training:
            return batch_norm_train_backward(g, self.xhat, self.gamma, self.invstd)
        return batch_norm_eval_backward(g, self.x, self.gamma, self.mean, self.invstd)


@gpu_implementation(lambda: _gpu_batchnorm().batch_norm_eval_backward)
def batch_norm_eval_backward(g, x, gamma, mean, invstd):
    """(dx, dgamma, dbeta) for the evaluation-mode forward (fixed statistics)."""
    channels = ChannelView(x)
    g2 = channels.view(g)
    xhat = (channels.view(x) - channels.per_channel(mean)) * channels.per_channel(invstd)
    dgamma = channels.sums(g2 * xhat)
    dbeta = channels.sums(g2)
    dx = g2 * channels.per_channel(gamma * invstd)
    return channels.wrap(dx), dgamma, dbeta


def batch_norm(x, gamma, beta, running_mean, running_var, training: bool, momentum: float = 0.1,
               eps: float = 1e-5):
    """Batch normalisation; in training the raw `running_mean`/`running_var` arrays are updated in place."""
    running_mean = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    running_var = running_var.data if isinstance(running_var, Tensor) else running_var
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm: evaluation mode needs running_mean and running_var")
    return BatchNorm(running_mean, running_var, training, momentum, eps)(x, gamma, beta)
