"""Convolutions and transposed convolutions on CuPy arrays, with the signatures of nfed.core.functions.conv.

The forward picks one of four algorithms per shape (conv2d_forward_path): a direct kernel for short
reductions (C*kh*kw <= 32: the W-Net's 3- and 2-channel first layers); Winograd for 3x3 stride-1 layers in
fp32/float64 (kernels/winograd.cu + one batched GEMM: F(2x2, 3x3) forward and input gradient, F(3x3, 2x2)
weight gradient); a plain GEMM for 1x1; else im2col/col2im kernels (kernels/im2col.cu) around cuBLAS GEMMs
(nfed.gpu.gemm, which honours the fp32|tf32|bf16 mode: tf32 and bf16 use this tensor-core path for every
layer the direct kernel does not take). NFED_CONV_ALGORITHM=im2col forces the GEMM path everywhere (the
benches time both). Layouts: NCHW activations, conv weight [O, C, kh, kw], conv-transpose weight
[C_in, C_out, kh, kw]; float32 and float64 only (backend.Unsupported otherwise: the core then runs its
array-agnostic code).
"""
from __future__ import annotations

import math
import os

import numpy as np

from nfed.common import backend
from nfed.gpu import gemm, kernels, precision


def _col_budget_bytes() -> int:
    """Largest im2col buffer a convolution may allocate (env NFED_IM2COL_BUDGET_MB, default 256 MiB)."""
    return int(float(os.environ.get("NFED_IM2COL_BUDGET_MB", "256")) * 2 ** 20)


def _chunk(n: int, per_sample_bytes: int) -> int:
    """Samples per chunk so that a chunk's temporary buffers stay within the im2col budget (at least 1)."""
    return max(1, min(n, _col_budget_bytes() // max(1, per_sample_bytes)))


def im2col(x, kernel_size, stride=1, padding=0, out_bf16: bool = False):
    """x [N, C, H, W] -> col [N, C*kh*kw, HO*WO] (uint16 bfloat16 bits when out_bf16)."""
    cp = backend.cupy_module()
    x = kernels.contiguous(x)
    n, c, h, w = x.shape
    kh, kw = kernels.pair(kernel_size)
    (sh, sw), (ph, pw) = kernels.pair(stride), kernels.pair(padding)
    if sh != sw or ph != pw:
        raise backend.Unsupported("GPU im2col supports equal strides and paddings in both directions")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"convolution window {kh}x{kw} larger than the padded input {h}x{w}")
    k = c * kh * kw
    if out_bf16:
        if x.dtype != np.float32:
            raise TypeError("bf16 im2col needs float32 input")
        col, name = cp.empty((n, k, ho * wo), dtype=np.uint16), "im2col_NCHW_f32_to_bf16"
    else:
        col, name = cp.empty((n, k, ho * wo), dtype=x.dtype), f"im2col_NCHW_{kernels.dtype_suffix(x.dtype)}"
    if col.size:
        kernels.launch(name, kernels.grid_planes(n * k, ho * wo),
                       (x, col, n, c, h, w, kh, kw, sh, ph, ho, wo), kernels.device_index(x))
    return col


def col2im(col, x_shape, kernel_size, stride=1, padding=0):
    """col [N, C*kh*kw, HO*WO] -> x [N, C, H, W], summing overlapping contributions (a gather, no atomics)."""
    cp = backend.cupy_module()
    col = kernels.contiguous(col)
    n, c, h, w = (int(s) for s in x_shape)
    kh, kw = kernels.pair(kernel_size)
    (sh, sw), (ph, pw) = kernels.pair(stride), kernels.pair(padding)
    if sh != sw or ph != pw:
        raise backend.Unsupported("GPU col2im supports equal strides and paddings in both directions")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if col.shape != (n, c * kh * kw, ho * wo):
        raise ValueError(f"col2im: col shape {col.shape} does not match {(n, c * kh * kw, ho * wo)}")
    x = cp.empty((n, c, h, w), dtype=col.dtype)
    if x.size:
        kernels.launch(f"col2im_NCHW_{kernels.dtype_suffix(col.dtype)}", kernels.grid_planes(n * c, h * w),
                       (col, x, n, c, h, w, kh, kw, sh, ph, ho, wo), kernels.device_index(col))
    return x


# --- convolution ---------------------------------------------------------------------------------------

def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _square(stride, padding) -> tuple[int, int]:
    (sh, sw), (ph, pw) = kernels.pair(stride), kernels.pair(padding)
    if sh != sw or ph != pw:
        raise backend.Unsupported("GPU convolutions take equal strides and paddings in both directions")
    return sh, ph


def _is_pointwise(kh: int, kw: int, stride: int, padding: int) -> bool:
    return kh == 1 and kw == 1 and stride == 1 and padding == 0


def add_channel_bias(y, bias):
    """y[N, C, ...] += bias[C], in place."""
    if bias is None:
        return y
    n, c = y.shape[0], y.shape[1]
    hw = int(np.prod(y.shape[2:], dtype=np.int64))
    bias = kernels.contiguous(bias.astype(y.dtype, copy=False))
    kernels.launch(f"add_channel_bias_NCHW_{kernels.dtype_suffix(y.dtype)}", kernels.grid_planes(n * c, hw),
                   (y, bias, n * c, c, hw), kernels.device_index(y))
    return y


def channel_sum(x):
    """Sum over every axis but 1 of an [N, C, ...] array (conv bias gradient), deterministic."""
    x = kernels.contiguous(x)
    n, c = x.shape[0], x.shape[1]
    hw = int(np.prod(x.shape[2:], dtype=np.int64))
    splits = kernels.channel_splits(n * hw, c, kernels.device_index(x))
    cp = backend.cupy_module()
    partial = cp.empty((c, splits, 2), dtype=x.dtype)
    kernels.launch(f"channel_partial_sums_NCHW_{kernels.dtype_suffix(x.dtype)}", (splits, c),
                   (x, n, c, hw, partial), kernels.device_index(x))
    return partial[:, :, 0].sum(axis=1)


DIRECT_OUT_CHANNELS = 16  # NFED_DIRECT_OB in kernels/conv_direct.cu


ENV_CONV_ALGORITHM = "NFED_CONV_ALGORITHM"  # auto (default) | im2col: GEMM-based everywhere, for comparisons


def direct_reduction_limit() -> int:
    """Largest C*kh*kw convolved directly, without im2col (env NFED_CONV_DIRECT_MAX_K, default 32; 0 = never)."""
    return int(os.environ.get("NFED_CONV_DIRECT_MAX_K", "32"))


def conv2d_forward_path(channels: int, kh: int, kw: int, stride: int = 1, padding: int = 0,
                        dtype=np.float32) -> str:
    """Which forward algorithm conv2d_forward uses: 'direct' (short reductions), 'winograd' (3x3 stride 1
    in fp32/float64: tf32 and bf16 keep their tensor-core GEMMs), 'gemm' (1x1) or 'im2col+gemm'."""
    auto = os.environ.get(ENV_CONV_ALGORITHM, "auto").strip().lower() != "im2col"
    if auto and channels * kh * kw <= direct_reduction_limit():
        return "direct"
    if _is_pointwise(kh, kw, stride, padding):
        return "gemm"
    exact = np.dtype(dtype) == np.float64 or precision.get_precision() == "fp32"
    if auto and exact and kh == kw == 3 and stride == 1 and padding <= 2:
        return "winograd"
    return "im2col+gemm"


def _winograd_input_chunks(x, out_channels: int, padding: int, th: int, tw: int):
    """(first sample, samples, V) per chunk of x: V [16, C, samples * tiles] the Winograd input transform of
    those samples' th x tw tiles, chunks sized so V and its product with O channels fit the im2col budget."""
    cp = backend.cupy_module()
    n, c, h, w = x.shape
    tiles = th * tw
    dev = kernels.device_index(x)
    step = _chunk(n, 16 * (c + out_channels) * tiles * x.dtype.itemsize)
    for n0 in range(0, n, step):
        nb = min(step, n - n0)
        v = cp.empty((16, c, nb * tiles), dtype=x.dtype)
        kernels.launch(f"winograd_input_transform_NCHW_{kernels.dtype_suffix(x.dtype)}",
                       kernels.grid_planes(c, nb * tiles), (x[n0:n0 + nb], v, nb, c, h, w, padding, th, tw), dev)
        yield n0, nb, v


def _conv2d_winograd(x, weight, bias, y, padding):
    """Winograd F(2x2, 3x3) forward into y (kernels/winograd.cu around one batched GEMM per chunk)."""
    cp = backend.cupy_module()
    c, o = x.shape[1], weight.shape[0]
    ho, wo = y.shape[2], y.shape[3]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    dev = kernels.device_index(x)
    suffix = kernels.dtype_suffix(x.dtype)
    u = cp.empty((16, o, c), dtype=x.dtype)
    kernels.launch(f"winograd_filter_transform_{suffix}", kernels.grid_1d(o * c, dev), (weight, u, o, c), dev)
    for n0, nb, v in _winograd_input_chunks(x, o, padding, th, tw):
        m = gemm.gemm(u, v, mode="fp32")
        del v
        kernels.launch(f"winograd_output_transform_NCHW_{suffix}", kernels.grid_planes(o, nb * th * tw),
                       (m, bias, y[n0:n0 + nb], nb, o, ho, wo, th, tw), dev)
        del m
    return y


def _conv2d_direct(x, weight, bias, y, s, p):
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = y.shape[2], y.shape[3]
    rows = n * math.ceil(o / DIRECT_OUT_CHANNELS)
    kernels.launch(f"conv2d_direct_NCHW_{kernels.dtype_suffix(x.dtype)}", kernels.grid_planes(rows, ho * wo),
                   (x, weight, bias, y, n, c, h, w, o, kh, kw, s, p, ho, wo), kernels.device_index(x))
    return y


def _conv2d_weight_grad_winograd(x, gy, padding):
    """Weight gradient of a 3x3 stride-1 conv by Winograd F(3x3, 2x2): one batched GEMM per chunk."""
    cp = backend.cupy_module()
    c = x.shape[1]
    o, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    dev = kernels.device_index(x)
    suffix = kernels.dtype_suffix(x.dtype)
    m = cp.zeros((16, o, c), dtype=x.dtype)
    for n0, nb, v in _winograd_input_chunks(x, o, padding, th, tw):
        ug = cp.empty((16, o, nb * th * tw), dtype=x.dtype)
        kernels.launch(f"winograd_grad_transform_NCHW_{suffix}", kernels.grid_planes(o, nb * th * tw),
                       (gy[n0:n0 + nb], ug, nb, o, ho, wo, th, tw), dev)
        gemm.gemm(ug, v, trans_b=True, out=m, beta=1.0, mode="fp32")
        del v, ug
    dw = cp.empty((o, c, 3, 3), dtype=x.dtype)
    kernels.launch(f"winograd_weight_output_transform_{suffix}", kernels.grid_1d(o * c, dev), (m, dw, o, c), dev)
    return dw


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """y = conv2d(x, weight) + bias; x [N, C, H, W], weight [O, C, kh, kw] -> y [N, O, HO, WO]."""
    cp = backend.cupy_module()
    x, weight = kernels.contiguous(x), kernels.contiguous(weight)
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {c_w}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise backend.Unsupported("GPU conv2d needs input, weight and bias of one dtype")
    s, p = _square(stride, padding)
    ho, wo = _out_size(h, kh, s, p), _out_size(w, kw, s, p)
    k = c * kh * kw
    y = cp.empty((n, o, ho, wo), dtype=x.dtype)
    path = conv2d_forward_path(c, kh, kw, s, p, x.dtype)
    if path == "direct":
        return _conv2d_direct(x, weight, None if bias is None else kernels.contiguous(bias), y, s, p)
    if path == "winograd":
        return _conv2d_winograd(x, weight, None if bias is None else kernels.contiguous(bias), y, p)
    bf16 = gemm.bf16_mode(x.dtype)
    w_mat = gemm.operand(weight.reshape(o, k))
    if path == "gemm":
        gemm.gemm(w_mat, x.reshape(n, c, h * w), out=y.reshape(n, o, ho * wo))
    else:
        step = _chunk(n, k * ho * wo * (2 if bf16 else x.dtype.itemsize))
        for n0 in range(0, n, step):
            col = im2col(x[n0:n0 + step], (kh, kw), s, p, out_bf16=bf16)
            gemm.gemm(w_mat, col, out=y[n0:n0 + step].reshape(-1, o, ho * wo))
            del col
    return add_channel_bias(y, bias)


def conv2d_backward_input(grad_output, weight, x_shape, stride=1, padding=0):
    """Gradient of conv2d with respect to its input: col2im(weight^T @ grad_output)."""
    cp = backend.cupy_module()
    gy, weight = kernels.contiguous(grad_output), kernels.contiguous(weight)
    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = weight.shape
    s, p = _square(stride, padding)
    ho, wo = gy.shape[2], gy.shape[3]
    k = c * kh * kw
    flipped_padding = kh - 1 - p
    if (s == 1 and kh == kw and flipped_padding >= 0
            and conv2d_forward_path(o, kh, kw, 1, flipped_padding, gy.dtype) in ("winograd", "direct")):
        # stride 1: the input gradient is the convolution of gy with the flipped, transposed kernel
        flipped = cp.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        return conv2d_forward(gy, flipped, None, 1, flipped_padding)
    w_mat = gemm.operand(weight.reshape(o, k))
    gy_mat = gemm.operand(gy).reshape(n, o, ho * wo)
    if _is_pointwise(kh, kw, s, p):
        gx = cp.empty((n, c, h, w), dtype=gy.dtype)
        gemm.gemm(w_mat, gy_mat, trans_a=True, out=gx.reshape(n, c, h * w))
        return gx
    parts = []
    step = _chunk(n, k * ho * wo * gy.dtype.itemsize)
    for n0 in range(0, n, step):
        gcol = gemm.gemm(w_mat, gy_mat[n0:n0 + step], trans_a=True)
        parts.append(col2im(gcol, (gcol.shape[0], c, h, w), (kh, kw), s, p))
        del gcol
    return parts[0] if len(parts) == 1 else cp.concatenate(parts, axis=0)


def conv2d_backward_weight(x, grad_output, weight_shape, stride=1, padding=0):
    """Gradient of conv2d with respect to its weight: sum_n grad_output[n] @ im2col(x)[n]^T."""
    cp = backend.cupy_module()
    gy, x = kernels.contiguous(grad_output), kernels.contiguous(x)
    o, c, kh, kw = (int(v) for v in weight_shape)
    n = x.shape[0]
    s, p = _square(stride, padding)
    ho, wo = gy.shape[2], gy.shape[3]
    k = c * kh * kw
    if conv2d_forward_path(c, kh, kw, s, p, x.dtype) == "winograd" and x.dtype == gy.dtype:
        return _conv2d_weight_grad_winograd(x, gy, p)
    bf16 = gemm.bf16_mode(x.dtype)
    gy_mat = gemm.operand(gy).reshape(n, o, ho * wo)
    gw = cp.zeros((o, k), dtype=x.dtype)
    pointwise = _is_pointwise(kh, kw, s, p)
    step = n if pointwise else _chunk(n, k * ho * wo * (2 if bf16 else x.dtype.itemsize))
    for n0 in range(0, n, step):
        if pointwise:
            col = gemm.operand(x).reshape(n, c, ho * wo)
        else:
            col = im2col(x[n0:n0 + step], (kh, kw), s, p, out_bf16=bf16)
        for i in range(col.shape[0]):
            gemm.gemm(gy_mat[n0 + i], col[i], trans_b=True, out=gw, beta=1.0)
        del col
    return gw.reshape(o, c, kh, kw)


def conv2d_backward_bias(grad_output):
    """Gradient of conv2d with respect to its bias: sum of grad_output over N, H, W."""
    return channel_sum(grad_output)


def conv_transpose2d_forward(x, weight, bias=None, stride=2, padding=0):
    """Transposed convolution (weight [C_in, C_out, kh, kw]): the input gradient of the matching conv2d."""
    n, c_in, h, w = x.shape
    c_w, c_out, kh, kw = weight.shape
    if c_w != c_in:
        raise ValueError(f"conv_transpose2d: input has {c_in} channels, weight expects {c_w}")
    s, p = _square(stride, padding)
    out_shape = (n, c_out, (h - 1) * s - 2 * p + kh, (w - 1) * s - 2 * p + kw)
    y = conv2d_backward_input(x, weight, out_shape, s, p)
    return add_channel_bias(y, bias)


def conv_transpose2d_backward_input(grad_output, weight, stride=2, padding=0):
    """Input gradient of conv_transpose2d: the matching conv2d applied to grad_output."""
    return conv2d_forward(grad_output, weight, None, stride, padding)


def conv_transpose2d_backward_weight(x, grad_output, weight_shape, stride=2, padding=0):
    """Weight gradient of conv_transpose2d ([C_in, C_out, kh, kw]): roles of input and output swapped."""
    return conv2d_backward_weight(grad_output, x, weight_shape, stride, padding)
