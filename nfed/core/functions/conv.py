"""2-D convolution and transposed convolution (PyTorch layouts and semantics).

The heavy lifting is in module-level functions on raw arrays (`conv2d_forward`, `conv2d_backward_input`,
`conv2d_backward_weight`, `conv2d_backward_bias`, `conv_transpose2d_*`); the Function classes only decide
what to save and call these. Each of them hands CuPy arrays to its CUDA implementation in nfed.gpu.conv
(`@gpu_implementation`, nfed.core.dispatch), which falls back to the code here for arguments it does not take.
Transposed convolution is the adjoint of convolution: its forward is conv2d's input gradient and its
input gradient is conv2d's forward. Channels-last NumPy arrays (layout.py) take the kernels of conv_cpu.py for
stride 1, non-overlapping patches and 1x1 kernels (1x1 in any layout); the array-agnostic code below serves NCHW
arrays, the other cases and CuPy arrays that the GPU kernels hand back.
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.core.autograd import Function
from nfed.core.dispatch import gpu_implementation
from nfed.core.functions import conv_cpu
from nfed.core.functions.im2col import col2im, conv_output_size, flat_cols, im2col, padded_rows
from nfed.core.functions.layout import ChannelView, channels_innermost
from nfed.core.functions.parallel import run_blocks
from nfed.core.functions.utils import pair

# Bytes of patch matrix per block on the CPU: small enough to stay in cache between the copy that builds it
# and the matrix product that consumes it, large enough for an efficient sgemm; blocks run in parallel
# (see parallel.py). GPUs take whole samples at once.
CPU_BLOCK_BYTES = 2 << 20
GPU_BLOCK_BYTES = 256 << 20


def _row_blocks(xp, n: int, rows: int, row_bytes: int) -> list[tuple[int, int, int]]:
    """(sample, first row, row count) blocks covering n samples of `rows` output rows."""
    budget = CPU_BLOCK_BYTES if xp is np else GPU_BLOCK_BYTES
    step = max(1, min(rows, budget // max(1, row_bytes)))
    return [(i, r0, min(step, rows - r0)) for i in range(n) for r0 in range(0, rows, step)]


# Below this many multiply-adds a whole op runs on the calling thread (pool hand-off costs ~50 us a block).
PARALLEL_MIN_WORK = 1 << 22


def _map(xp, task, items, work: int) -> list:
    """Run task over items: on the CPU worker pool for NumPy (when worth it), in order for CuPy."""
    if xp is np and work >= PARALLEL_MIN_WORK:
        return run_blocks(task, items)
    return [task(item) for item in items]


def _is_pointwise(kh, kw, sh, sw, ph, pw) -> bool:
    return kh == kw == 1 and sh == sw == 1 and ph == pw == 0


def _is_disjoint(kh, kw, sh, sw, ph, pw, h, wd) -> bool:
    """Stride = kernel, no padding, the image tiled exactly: every input pixel is in one patch."""
    return (sh, sw) == (kh, kw) and ph == pw == 0 and h % kh == 0 and wd % kw == 0


def _cpu_family(xp, kh, kw, sh, sw, ph, pw, h, wd, data) -> str | None:
    """Which conv_cpu kernel family serves a NumPy convolution of these sizes whose input (or gradient) is
    `data` (None: the generic code). 1x1 kernels take it in any layout; the others only for channels-last
    data: NCHW data keeps the NCHW code below, which needs no layout conversions."""
    if xp is not np:
        return None
    if _is_pointwise(kh, kw, sh, sw, ph, pw):
        return "pointwise"
    if not _channels_last_data(data):
        return None
    if sh == sw == 1 and ph <= kh - 1 and pw <= kw - 1:
        return "stride1"
    if _is_disjoint(kh, kw, sh, sw, ph, pw, h, wd):
        return "disjoint"
    return None


def _channels_last_data(a) -> bool:
    return channels_innermost(a)


def _gpu_conv():
    from nfed.gpu import conv  # noqa: PLC0415 - at the first CuPy call: importing nfed loads no CuPy

    return conv


@gpu_implementation(lambda: _gpu_conv().conv2d_forward)
def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """y[n, o] = sum_c x[n, c] (cross-correlated with) w[o, c] + b[o]; x [N, C, H, W], w [O, C, kh, kw]."""
    xp = backend.array_module(x, w)
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {cw}")
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(wd, kw, sw, pw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} larger than padded input {h + 2 * ph}x{wd + 2 * pw}")
    family = _cpu_family(xp, kh, kw, sh, sw, ph, pw, h, wd, x)
    if family is not None:
        return conv_cpu.forward(family, x, w, b, (ph, pw))
    w2 = w.reshape(o, c * kh * kw)
    if sh == 1 and sw == 1 and not _is_pointwise(kh, kw, sh, sw, ph, pw):
        return _conv2d_forward_flat(x, w2, b, kh, kw, ph, pw, ho, wo)
    out = xp.empty((n, o, ho * wo), dtype=xp.result_type(x.dtype, w.dtype))
    bias = None if b is None else b.reshape(o, 1)

    def sample(i):  # 1x1: the image itself is the patch matrix; otherwise strided patches
        cols = x[i].reshape(c, h * wd) if kh * kw == 1 and ph == pw == 0 and sh == sw == 1 \
            else im2col(x[i:i + 1], kh, kw, sh, sw, ph, pw)[0]
        xp.matmul(w2, cols, out=out[i])
        if bias is not None:
            out[i] += bias

    _map(xp, sample, range(n), n * o * c * kh * kw * ho * wo)
    return out.reshape(n, o, ho, wo)


def _conv2d_forward_flat(x, w2, b, kh, kw, ph, pw, ho, wo):
    """Stride-1 convolution block by block: a few output rows' patch matrix, one sgemm, store."""
    xp = backend.array_module(x, w2)
    n, c, h, wd = x.shape
    o, k = w2.shape
    wp = wd + 2 * pw
    dtype = xp.result_type(x.dtype, w2.dtype)
    out = xp.empty((n, o, ho, wo), dtype=dtype)
    bias = None if b is None else b.reshape(o, 1, 1)

    def block(item):
        i, r0, r = item
        length = r * wp
        cols = flat_cols(padded_rows(x[i], r0, r + kh - 1, ph, pw, kw - 1), kh, kw, wp, 0, length)
        valid = xp.matmul(w2, cols).reshape(o, r, wp)[:, :, :wo]
        if bias is None:
            out[i, :, r0:r0 + r] = valid
        else:
            xp.add(valid, bias, out=out[i, :, r0:r0 + r])

    _map(xp, block, _row_blocks(xp, n, ho, k * wp * x.itemsize), n * o * k * ho * wp)
    return out


@gpu_implementation(lambda: _gpu_conv().conv2d_backward_input)
def conv2d_backward_input(gout, w, x_shape, stride=1, padding=0):
    """d(loss)/dx of conv2d, given d(loss)/dy `gout` [N, O, Ho, Wo]: a transposed convolution."""
    return _scatter_patches(gout, w, x_shape, stride, padding, None)


def _scatter_patches(gout, w, x_shape, stride, padding, b):
    """Transposed convolution of gout [N, O, Ho, Wo] with w [O, C, kh, kw] into [N, C, H, W] (+ b[c])."""
    xp = backend.array_module(gout, w)
    n, o, ho, wo = gout.shape
    _, c, kh, kw = w.shape
    h, wd = x_shape[2], x_shape[3]
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    family = _cpu_family(xp, kh, kw, sh, sw, ph, pw, h, wd, gout)
    if family is not None and family != "stride1":  # stride 1: the flipped-kernel convolution below
        return conv_cpu.input_grad(family, gout, w, x_shape, b)
    if sh == 1 and sw == 1 and ph <= kh - 1 and pw <= kw - 1 and not _is_pointwise(kh, kw, sh, sw, ph, pw):
        # Stride 1: the input gradient is a plain convolution with the flipped, transposed kernel.
        flipped = xp.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        return conv2d_forward(gout, flipped, b, 1, (kh - 1 - ph, kw - 1 - pw))
    w2t = w.reshape(o, c * kh * kw).T
    dx = xp.empty((n, c, h, wd), dtype=xp.result_type(gout.dtype, w.dtype))
    disjoint = (sh, sw) == (kh, kw) and ph == pw == 0 and h == ho * kh and wd == wo * kw
    bias = None if b is None else b.reshape(c, 1, 1, 1, 1)

    def sample(i):
        dcols = xp.matmul(w2t, gout[i].reshape(o, ho * wo))
        if disjoint:  # e.g. 1x1, or 2x2 stride 2: every patch entry lands on its own pixel
            src = dcols.reshape(c, kh, kw, ho, wo).transpose(0, 3, 1, 4, 2)
            dst = dx[i].reshape(c, ho, kh, wo, kw)
            if bias is None:
                dst[...] = src
            else:
                xp.add(src, bias, out=dst)
        else:
            dx[i] = col2im(dcols[None], (1, c, h, wd), kh, kw, sh, sw, ph, pw)[0]
            if bias is not None:
                dx[i] += bias.reshape(c, 1, 1)

    _map(xp, sample, range(n), n * o * c * kh * kw * ho * wo)
    return dx


@gpu_implementation(lambda: _gpu_conv().conv2d_backward_weight)
def conv2d_backward_weight(x, gout, w_shape, stride=1, padding=0):
    """d(loss)/dw of conv2d [O, C, kh, kw]: patches of x against the output gradient."""
    xp = backend.array_module(x, gout)
    n, c, h, wd = x.shape
    o, _, kh, kw = w_shape
    _, _, ho, wo = gout.shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    family = _cpu_family(xp, kh, kw, sh, sw, ph, pw, h, wd, x)
    if family is not None:
        return conv_cpu.weight_grad(family, x, gout, w_shape, (ph, pw))
    dtype = xp.result_type(x.dtype, gout.dtype)
    if not (sh == 1 and sw == 1) or _is_pointwise(kh, kw, sh, sw, ph, pw):
        def sample(i):
            cols = x[i].reshape(c, h * wd) if _is_pointwise(kh, kw, sh, sw, ph, pw) \
                else im2col(x[i:i + 1], kh, kw, sh, sw, ph, pw)[0]
            return xp.matmul(gout[i].reshape(o, ho * wo), cols.T)

        parts = _map(xp, sample, range(n), n * o * c * kh * kw * ho * wo)
        return _total(xp, parts, (o, c * kh * kw), dtype).reshape(w_shape)
    wp = wd + 2 * pw
    k = c * kh * kw

    def block(item):
        i, r0, r = item
        length = r * wp
        cols = flat_cols(padded_rows(x[i], r0, r + kh - 1, ph, pw, kw - 1), kh, kw, wp, 0, length)
        # The output gradient on the same rows x Wp grid as the patches; the Wp - Wo extra columns are 0.
        g = xp.zeros((o, r, wp), dtype=gout.dtype)
        g[:, :, :wo] = gout[i, :, r0:r0 + r]
        return xp.matmul(g.reshape(o, length), cols.T)

    parts = _map(xp, block, _row_blocks(xp, n, ho, k * wp * x.itemsize), n * o * k * ho * wp)
    return _total(xp, parts, (o, k), dtype).reshape(w_shape)


def _total(xp, parts, shape, dtype):
    total = xp.zeros(shape, dtype=dtype)
    for part in parts:
        total += part
    return total


@gpu_implementation(lambda: _gpu_conv().conv2d_backward_bias)
def conv2d_backward_bias(gout):
    """d(loss)/db: the output gradient summed over batch and pixels, per channel."""
    channels = ChannelView(gout)
    return channels.sums(channels.view(gout))


def conv_transpose2d_output_shape(x_shape, w_shape, stride=2, padding=0) -> tuple:
    n, _, h, wd = x_shape
    _, c_out, kh, kw = w_shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    return n, c_out, (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw


@gpu_implementation(lambda: _gpu_conv().conv_transpose2d_forward)
def conv_transpose2d_forward(x, w, b=None, stride=2, padding=0):
    """Transposed convolution; x [N, C_in, H, W], w [C_in, C_out, kh, kw] (PyTorch layout)."""
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"conv_transpose2d: input has {x.shape[1]} channels, weight expects {w.shape[0]}")
    out_shape = conv_transpose2d_output_shape(x.shape, w.shape, stride, padding)
    if out_shape[2] <= 0 or out_shape[3] <= 0:
        raise ValueError(f"conv_transpose2d: empty output {out_shape[2]}x{out_shape[3]}")
    return _scatter_patches(x, w, out_shape, stride, padding, b)


@gpu_implementation(lambda: _gpu_conv().conv_transpose2d_backward_input)
def conv_transpose2d_backward_input(gout, w, stride=2, padding=0):
    """d(loss)/dx of conv_transpose2d: a plain convolution of the output gradient."""
    return conv2d_forward(gout, w, None, stride, padding)


@gpu_implementation(lambda: _gpu_conv().conv_transpose2d_backward_weight)
def conv_transpose2d_backward_weight(x, gout, w_shape, stride=2, padding=0):
    """d(loss)/dw of conv_transpose2d [C_in, C_out, kh, kw]."""
    return conv2d_backward_weight(gout, x, w_shape, stride, padding)


class _Convolution(Function):
    """Node logic shared by conv2d and conv_transpose2d: keep x only for the weight gradient and w only
    for the input gradient; subclasses name the raw-array functions."""

    def __init__(self, stride, padding):
        self.stride = stride
        self.padding = padding

    def forward(self, x, w, b=None):
        if self.recording:
            needs = self.needs_input_grad
            self.x = x if needs[1] else None
            self.w = w if needs[0] else None
            self.x_shape = x.shape
            self.w_shape = w.shape
        return self.compute(x, w, b)

    def backward(self, g):
        needs = self.needs_input_grad
        gx = self.input_grad(g) if needs[0] else None
        gw = self.weight_grad(g) if needs[1] else None
        if len(needs) == 2:
            return gx, gw
        return gx, gw, conv2d_backward_bias(g) if needs[2] else None


class Conv2d(_Convolution):
    def compute(self, x, w, b):
        return conv2d_forward(x, w, b, self.stride, self.padding)

    def input_grad(self, g):
        return conv2d_backward_input(g, self.w, self.x_shape, self.stride, self.padding)

    def weight_grad(self, g):
        return conv2d_backward_weight(self.x, g, self.w_shape, self.stride, self.padding)


class ConvTranspose2d(_Convolution):
    def compute(self, x, w, b):
        return conv_transpose2d_forward(x, w, b, self.stride, self.padding)

    def input_grad(self, g):
        return conv_transpose2d_backward_input(g, self.w, self.stride, self.padding)

    def weight_grad(self, g):
        return conv_transpose2d_backward_weight(self.x, g, self.w_shape, self.stride, self.padding)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation like torch.nn.functional.conv2d: x [N, C, H, W], weight [O, C, kh, kw]."""
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d(stride, padding)(*inputs)


def conv_transpose2d(x, weight, bias=None, stride=2, padding=0):
    """Transposed convolution like torch.nn.functional.conv_transpose2d: weight [C_in, C_out, kh, kw]."""
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d(stride, padding)(*inputs)
