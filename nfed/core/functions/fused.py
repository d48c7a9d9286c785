"""Convolution -> batch norm -> ReLU as one op on NumPy arrays: the W-Net's unit, 36 of them in a step.

Fused on the CPU because batch norm and ReLU are memory-bound passes over the convolution's output. Forward:
the batch statistics are summed from each block of convolution output while it is in cache (conv_cpu's
epilogue), then normalisation and ReLU run over row blocks on the worker pool. Backward: the gradient through
ReLU and batch norm is written straight into the zero-bordered buffer from which one patch matrix per block
gives both the input and the weight gradient (conv_cpu.padded_conv_grads); the normalised values are
recomputed from the saved convolution output and the ReLU mask comes from the saved output. In evaluation
without a graph the running statistics fold into the convolution's weights and bias: one product and a
ReLU per block. CuPy arrays take the convolution, then batch norm and ReLU fused in one GPU pass each way
(nfed.gpu.batchnorm, BatchNormReLU below); graphs through evaluation-mode batch norm on NumPy arrays take the
three separate ops.
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.core.autograd import Function, Tensor, is_grad_enabled
from nfed.core.functions import conv_cpu
from nfed.core.functions.activation import relu
from nfed.core.functions.conv import conv2d
from nfed.core.functions.layout import channel_row, from_nhwc, nhwc
from nfed.core.functions.normalization import BatchNorm, batch_norm, update_running_stats
from nfed.core.functions.parallel import run_blocks
from nfed.core.functions.utils import pair

# False: conv_bn_relu always takes the three separate ops (e.g. to see every convolution in conv2d_forward).
ENABLED = True

# Values per block of the element-wise passes (256 KiB of float32: they stay in L2 from one pass to the
# next), and the array size from which those passes go to the worker pool.
BLOCK_VALUES = 1 << 16
PARALLEL_MIN_VALUES = 1 << 15


class _ImageRows:
    """[N, H, W, C] arrays (contiguous, or the inside of a zero-bordered one) as image rows [N, H, W * C],
    processed in blocks of rows; per-channel vectors are tiled W times to match a row."""

    def __init__(self, shape):
        self.n, self.h, self.w, self.c = shape
        per = max(1, BLOCK_VALUES // (self.w * self.c))
        if per >= self.h:
            images = max(1, per // self.h)
            self.blocks = [(i, min(self.n, i + images), 0, self.h) for i in range(0, self.n, images)]
        else:
            self.blocks = [(i, i + 1, r, min(self.h, r + per)) for i in range(self.n) for r in range(0, self.h, per)]
        self.parallel = self.n * self.h * self.w * self.c >= PARALLEL_MIN_VALUES and len(self.blocks) > 1

    def __call__(self, a):
        """The [N, H, W * C] view of a (an error, never a silent copy, if the rows are not contiguous)."""
        view = a.view()
        view.shape = (self.n, self.h, self.w * self.c)
        return view

    def tile(self, values, dtype):
        return channel_row(values, self.w, dtype)

    def sums(self, part):
        """Per-channel sums of an image-row block."""
        return part.sum(axis=(0, 1)).reshape(self.w, self.c).sum(axis=0)

    def map(self, task) -> list:
        """[task(block slice) for each block] in block order, on the worker pool for big arrays."""
        slices = [(slice(i0, i1), slice(r0, r1)) for i0, i1, r0, r1 in self.blocks]
        if self.parallel:
            return run_blocks(task, slices)
        return [task(item) for item in slices]


def _moments(width: int, channels: int):
    """Epilogue for padded_conv: (count, mean, sum of squared deviations) per channel of a block of image rows
    [rows, width * channels]."""

    def moments(rows):
        count = rows.shape[0] * width
        mean = rows.sum(axis=0).reshape(width, channels).sum(axis=0) / count
        deviation = rows - channel_row(mean, width)
        squares = np.square(deviation, out=deviation).sum(axis=0).reshape(width, channels).sum(axis=0)
        return count, mean, squares

    return moments


def _combine_moments(parts):
    """Batch mean and biased variance (float64) from per-block moments (Chan et al.), in block order."""
    counts = np.array([p[0] for p in parts], dtype=np.float64)[:, None]
    means = np.stack([p[1] for p in parts]).astype(np.float64)
    total = counts.sum()
    mean = (counts * means).sum(axis=0) / total
    squares = np.stack([p[2] for p in parts]).sum(axis=0, dtype=np.float64) + (counts * (means - mean) ** 2).sum(axis=0)
    return mean, squares / total, int(total)


class ConvBNReLU(Function):
    """relu(batch_norm(conv2d(x, w, b, 1, padding))) on NumPy arrays; inputs (x, w, gamma, beta[, b])."""

    def __init__(self, running_mean, running_var, training: bool, momentum: float, eps: float, padding):
        self.running_mean = running_mean
        self.running_var = running_var
        self.training = training
        self.momentum = momentum
        self.eps = eps
        self.padding = padding

    def forward(self, x, w, gamma, beta, b=None):
        dtype = np.result_type(x.dtype, w.dtype)
        xpad = conv_cpu.padded_nhwc(x, *self.padding, dtype)
        if not self.training:
            return from_nhwc(self._folded(xpad, w, b, gamma, beta))
        o = w.shape[0]
        wo = xpad.shape[2] - w.shape[3] + 1
        z, parts = conv_cpu.padded_conv(xpad, w, b, epilogue=_moments(wo, o))
        mean, var, count = _combine_moments(parts)
        if self.running_mean is not None:
            update_running_stats(self.running_mean, self.running_var, mean.astype(self.running_mean.dtype),
                                 var.astype(self.running_var.dtype), count, self.momentum)
        invstd = 1.0 / np.sqrt(var + self.eps)
        scale = gamma * invstd
        rows = _ImageRows(z.shape)
        y = np.empty_like(z)
        zr, yr = rows(z), rows(y)
        mean_t, scale_t, beta_t = (rows.tile(v, dtype) for v in (mean, scale, beta))
        zero = np.zeros(zr.shape[2], dtype)

        def normalise(block):  # centred first, as in backward
            out = yr[block]
            np.subtract(zr[block], mean_t, out=out)
            out *= scale_t
            out += beta_t
            np.maximum(out, zero, out=out)

        rows.map(normalise)
        if self.recording:
            needs = self.needs_input_grad
            self.x = x if needs[1] else None
            self.w = w if needs[0] else None
            self.w_shape = w.shape
            self.z, self.y = z, y
            self.mean, self.invstd, self.scale = mean, invstd, scale
        self.running_mean = self.running_var = None  # the node must not pin the module's buffers
        return from_nhwc(y)

    def _folded(self, xpad, w, b, gamma, beta):
        """Evaluation: relu(conv(x, w * s) + (b - running_mean) * s + beta) with s = gamma / sqrt(var + eps)."""
        scale = gamma / np.sqrt(self.running_var + self.eps)
        shift = beta - self.running_mean * scale if b is None else beta + (b - self.running_mean) * scale
        weight = (w * scale.reshape(-1, 1, 1, 1)).astype(xpad.dtype)
        self.running_mean = self.running_var = None

        def relu_rows(rows):
            np.maximum(rows, zero, out=rows)

        zero = np.zeros((xpad.shape[2] - w.shape[3] + 1) * w.shape[0], dtype=xpad.dtype)
        out, _ = conv_cpu.padded_conv(xpad, weight, shift.astype(xpad.dtype), epilogue=relu_rows)
        return out

    def backward(self, g):
        z, y = self.z, self.y
        dtype = z.dtype
        rows = _ImageRows(z.shape)
        count = z.size // z.shape[-1]
        gpad = conv_cpu.zero_bordered(z.shape, conv_cpu.gradient_padding(self.w_shape, self.padding), dtype)
        zr, yr, dzr = rows(z), rows(y), rows(conv_cpu.inside(gpad, z.shape))
        gr = rows(np.ascontiguousarray(nhwc(g), dtype=dtype))
        mean_t = rows.tile(self.mean, dtype)

        def relu_grad_sums(block):
            """dz <- the gradient through ReLU; per-channel sums of it and of it times (z - mean)."""
            live = dzr[block]
            np.multiply(gr[block], yr[block] > 0, out=live)
            centred = zr[block] - mean_t
            centred *= live
            return rows.sums(live), rows.sums(centred)

        parts = rows.map(relu_grad_sums)
        dbeta = conv_cpu.sum_in_order([p[0] for p in parts])
        dgamma = conv_cpu.sum_in_order([p[1] for p in parts]) * self.invstd
        # dz = scale * (g - dbeta / M - xhat * dgamma / M) with xhat = (z - mean) * invstd (centred first:
        # z and mean may be large against their difference)
        scale_t = rows.tile(self.scale, dtype)
        slope_t = rows.tile(-self.scale * dgamma * self.invstd / count, dtype)
        offset_t = rows.tile(self.scale * dbeta / count, dtype)

        def normalisation_grad(block):
            out = dzr[block]
            out *= scale_t
            centred = zr[block] - mean_t
            centred *= slope_t
            out += centred
            out -= offset_t
            return rows.sums(out)

        bias_parts = rows.map(normalisation_grad)
        needs = self.needs_input_grad
        x_rows = None
        if needs[1]:
            x_rows = np.ascontiguousarray(nhwc(self.x), dtype=dtype)
        gx, gw = conv_cpu.padded_conv_grads(gpad, self.w_shape, self.w if needs[0] else None, x_rows)
        grads = [None if gx is None else from_nhwc(gx), gw,
                 dgamma.astype(dtype) if needs[2] else None, dbeta.astype(dtype) if needs[3] else None]
        if len(needs) == 5:
            grads.append(conv_cpu.sum_in_order(bias_parts).astype(dtype) if needs[4] else None)
        return tuple(grads)


class BatchNormReLU(BatchNorm):
    """relu(batch_norm(x)) on CuPy arrays: one kernel pass forward and one backward (nfed.gpu.batchnorm with
    relu=True; backward recomputes the ReLU mask from x, so neither xhat nor the output is kept)."""

    def forward(self, x, gamma, beta):
        from nfed.gpu import batchnorm  # noqa: PLC0415 - CuPy arrays only: importing nfed never loads CuPy

        y, mean, invstd = batchnorm.batch_norm_forward(x, gamma, beta, self.running_mean, self.running_var,
                                                       self.training, self.momentum, self.eps, relu=True)
        if self.recording:  # evaluation: `mean` is the running buffer, which may change before backward
            self.x, self.gamma, self.beta = x, gamma, beta
            self.mean, self.invstd = (mean if self.training else mean.copy()), invstd
        self.running_mean = self.running_var = None  # the node must not pin the module's buffers
        return y

    def backward(self, g):
        from nfed.gpu import batchnorm  # noqa: PLC0415

        return batchnorm.batch_norm_backward(g, self.x, self.gamma, self.beta, self.mean, self.invstd, self.training,
                                             relu=True)


def conv_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var, training: bool, momentum: float = 0.1,
                 eps: float = 1e-5, padding=1):
    """relu(batch_norm(conv2d(x, weight, bias, stride 1, padding))): one fused op on NumPy arrays, batch norm and
    ReLU fused on CuPy arrays (see the module docstring), else the three ops; `running_mean`/`running_var` are
    updated in place in training."""
    ph, pw = pair(padding)
    kh, kw = weight.shape[2:]
    cpu = backend.array_module(_raw(x), _raw(weight)) is np
    if ENABLED and not cpu and (training or running_mean is not None):
        z = conv2d(x, weight, bias, 1, padding)
        try:
            return BatchNormReLU(_raw(running_mean), _raw(running_var), training, momentum, eps)(z, gamma, beta)
        except backend.Unsupported:  # dtypes the kernels do not take
            return relu(batch_norm(z, gamma, beta, running_mean, running_var, training, momentum, eps))
    graph = is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, weight, bias, gamma, beta))
    if not (ENABLED and cpu and ph <= kh - 1 and pw <= kw - 1) or (not training and (graph or running_mean is None)):
        return relu(batch_norm(conv2d(x, weight, bias, 1, padding), gamma, beta, running_mean, running_var,
                               training, momentum, eps))
    op = ConvBNReLU(_raw(running_mean), _raw(running_var), training, momentum, eps, (ph, pw))
    return op(x, weight, gamma, beta) if bias is None else op(x, weight, gamma, beta, bias)


def _raw(a):
    return a.data if isinstance(a, Tensor) else a
