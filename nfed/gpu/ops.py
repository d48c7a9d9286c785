"""GPU implementations of nfed's heavy ops on CuPy arrays, with the CPU functions' signatures.

Convolutions pick one of four forward algorithms per shape (conv2d_forward_path): a direct kernel for
short reductions (C*kh*kw <= 32: the W-Net's 3- and 2-channel first layers); Winograd for 3x3 stride-1
layers in fp32/float64 (kernels/winograd.cu + one batched GEMM: F(2x2, 3x3) forward and input gradient,
F(3x3, 2x2) weight gradient); a plain GEMM for 1x1; else im2col/col2im kernels (kernels/im2col.cu)
around cuBLAS GEMMs (nfed.gpu.precision.gemm, which honours the fp32|tf32|bf16 mode: tf32 and bf16 use this
tensor-core path for every layer the direct kernel does not take). NFED_CONV_ALGORITHM=im2col forces the
GEMM path everywhere (the benches time both). Pooling, batch norm (+ fused ReLU), softmax cross-entropy,
the fused Adam/SGD updates and the FedAvg weighted sum are single-pass kernels from kernels/*.cu,
compiled once per process and device by nfed.common.backend.load_kernel. Every launch goes through `_launch`,
which converts the arguments to the C types declared in KERNELS (tests check that table against the
compiled PTX), so a wrong argument type cannot silently corrupt a launch.

Layouts: NCHW activations, conv weight [O, C, kh, kw], conv-transpose weight [C_in, C_out, kh, kw].
Only float32 and float64 arrays are accepted (float64 for gradient checks).
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from nfed.common import backend
from nfed.gpu import precision

# kernel name -> (source file, argument kinds): p = device array, i = int32, l = int64, f = float32,
# d = float64. Suffix _f32/_f64 selects the dtype; the table lists both.
_ARG_KINDS = {
    "im2col.cu": {
        "im2col_NCHW_{t}": "pp" + "i" * 10,
        "im2col_NCHW_f32_to_bf16": "pp" + "i" * 10,
        "col2im_NCHW_{t}": "pp" + "i" * 10,
        "float_to_bf16": "ppl",
    },
    "batchnorm.cu": {
        "bn_partial_sums_NCHW_{t}": "piiip",
        "bn_finalize_stats_{t}": "ppiiilddippppp",
        "bn_forward_apply_NCHW_{t}": "ppppppp" + "iiii",
        "bn_backward_partial_sums_NCHW_{t}": "pppppp" + "iiiiip",
        "bn_backward_apply_NCHW_{t}": "ppppppp" + "iiiiiip",
        "channel_partial_sums_NCHW_{t}": "piiip",
    },
    "pooling.cu": {
        "max_pool2d_forward_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_gather_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_scatter_NCHW_{t}_{i}": "ppp" + "l" + "iiiiii",
    },
    "softmax_ce.cu": {
        "softmax_NKHW_{t}": "pplili",
        "softmax_backward_NKHW_{t}": "ppplili",
        "softmax_cross_entropy_forward_NKHW_{t}": "pppllilpp",
        "softmax_cross_entropy_backward_NKHW_{t}": "ppplpililp",
    },
    "adam.cu": {
        "adam_update_{t}": "ppppl" + "dddddd" + "d" + "i",
        "sgd_update_{t}": "pppl" + "dddd" + "ii",
    },
    "conv_direct.cu": {
        "conv2d_direct_NCHW_{t}": "pppp" + "i" * 11,
    },
    "winograd.cu": {
        "winograd_filter_transform_{t}": "ppii",
        "winograd_input_transform_NCHW_{t}": "pp" + "i" * 7,
        "winograd_output_transform_NCHW_{t}": "ppp" + "i" * 6,
        "winograd_grad_transform_NCHW_{t}": "pp" + "i" * 6,
        "winograd_weight_output_transform_{t}": "ppii",
    },
    "fedavg.cu": {
        "weighted_sum_{t}": "ppipl",
        "weighted_sum_vec4_f32": "ppipl",
        "weighted_accumulate_f32": "ppfl",
        "weighted_accumulate_f64": "ppdl",
        "weighted_accumulate_f32_to_f64": "ppdl",
    },
    "elementwise.cu": {
        "add_channel_bias_NCHW_{t}": "pplii",
        "relu_forward_{t}": "ppl",
        "relu_backward_{t}": "pppl",
    },
}


def _expand_kernels() -> dict[str, tuple[str, str]]:
    table = {}
    for source, kernels in _ARG_KINDS.items():
        for name, kinds in kernels.items():
            for t in (("f32", "f64") if "{t}" in name else ("",)):
                for i in (("u8", "i32") if "{i}" in name else ("",)):
                    table[name.format(t=t, i=i)] = (source, kinds)
    return table


KERNELS: dict[str, tuple[str, str]] = _expand_kernels()

class Unsupported(Exception):
    """A GPU op cannot handle these arguments; the dispatcher then runs the array-agnostic CPU function."""


_BLOCK = 256
_MAX_GRID_Y = 65535
_SCALAR_TYPES = {"i": np.int32, "l": np.int64, "f": np.float32, "d": np.float64}


def _suffix(dtype) -> str:
    if dtype == np.float32:
        return "f32"
    if dtype == np.float64:
        return "f64"
    raise Unsupported(f"GPU ops support float32 and float64 arrays, got {dtype}")


@functools.lru_cache(maxsize=None)
def _function(name: str, device_index: int):
    source, _ = KERNELS[name]
    return backend.load_kernel(source, name, backend.Device("cuda", device_index))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    cp = backend.cupy_module()
    return int(cp.cuda.runtime.getDeviceProperties(device_index)["multiProcessorCount"])


def _launch(name: str, grid, args, device_index: int, block: int = _BLOCK) -> None:
    """Launch kernel `name` with arguments converted to the C types its KERNELS entry declares."""
    cp = backend.cupy_module()
    kinds = KERNELS[name][1]
    if len(args) != len(kinds):
        raise TypeError(f"kernel {name} takes {len(kinds)} arguments, got {len(args)}")
    converted = []
    for kind, value in zip(kinds, args):
        if kind == "p" and value is None:
            converted.append(np.uint64(0))  # a null pointer (8 bytes, like any device pointer)
        elif kind == "p":
            if not isinstance(value, cp.ndarray):
                raise TypeError(f"kernel {name}: expected a device array, got {type(value).__name__}")
            if not value.flags.c_contiguous:
                raise ValueError(f"kernel {name}: arrays must be C-contiguous")
            converted.append(value)
        else:
            converted.append(_SCALAR_TYPES[kind](value))
    grid = tuple(max(1, int(g)) for g in (grid if isinstance(grid, tuple) else (grid,)))
    with cp.cuda.Device(device_index):
        _function(name, device_index)(grid, (block,), tuple(converted))


def _grid_1d(n: int, device_index: int) -> int:
    return max(1, min(math.ceil(n / _BLOCK), _multiprocessors(device_index) * 16))


def _grid_planes(planes: int, pixels: int) -> tuple[int, int]:
    """x over the pixels of a plane, y over planes (grid-stride in both)."""
    return max(1, math.ceil(pixels / _BLOCK)), max(1, min(planes, _MAX_GRID_Y))


def _device_index(a) -> int:
    return a.device.id


def _contiguous(a):
    cp = backend.cupy_module()
    return a if a.flags.c_contiguous else cp.ascontiguousarray(a)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


# --- conversion ----------------------------------------------------------------------------------------

def float_to_bf16(x):
    """float32 array -> uint16 array of bfloat16 bits (round to nearest even; NaN stays NaN)."""
    cp = backend.cupy_module()
    if x.dtype != np.float32:
        raise TypeError(f"float_to_bf16 needs float32, got {x.dtype}")
    x = _contiguous(x)
    out = cp.empty(x.shape, dtype=np.uint16)
    if x.size:
        dev = _device_index(x)
        _launch("float_to_bf16", _grid_1d(x.size, dev), (x, out, x.size), dev)
    return out


# --- im2col / col2im -----------------------------------------------------------------------------------

def _col_budget_bytes() -> int:
    """Largest im2col buffer a convolution may allocate (env NFED_IM2COL_BUDGET_MB, default 256 MiB)."""
    return int(float(os.environ.get("NFED_IM2COL_BUDGET_MB", "256")) * 2 ** 20)


def _chunk(n: int, per_sample_bytes: int) -> int:
    return max(1, min(n, _col_budget_bytes() // max(1, per_sample_bytes)))


def im2col(x, kernel_size, stride=1, padding=0, out_bf16: bool = False):
    """x [N, C, H, W] -> col [N, C*kh*kw, HO*WO] (uint16 bfloat16 bits when out_bf16)."""
    cp = backend.cupy_module()
    x = _contiguous(x)
    n, c, h, w = x.shape
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if sh != sw or ph != pw:
        raise Unsupported("GPU im2col supports equal strides and paddings in both directions")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"convolution window {kh}x{kw} larger than the padded input {h}x{w}")
    k = c * kh * kw
    if out_bf16:
        if x.dtype != np.float32:
            raise TypeError("bf16 im2col needs float32 input")
        col, name = cp.empty((n, k, ho * wo), dtype=np.uint16), "im2col_NCHW_f32_to_bf16"
    else:
        col, name = cp.empty((n, k, ho * wo), dtype=x.dtype), f"im2col_NCHW_{_suffix(x.dtype)}"
    if col.size:
        _launch(name, _grid_planes(n * k, ho * wo),
                (x, col, n, c, h, w, kh, kw, sh, ph, ho, wo), _device_index(x))
    return col


def col2im(col, x_shape, kernel_size, stride=1, padding=0):
    """col [N, C*kh*kw, HO*WO] -> x [N, C, H, W], summing overlapping contributions (a gather, no atomics)."""
    cp = backend.cupy_module()
    col = _contiguous(col)
    n, c, h, w = (int(s) for s in x_shape)
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if sh != sw or ph != pw:
        raise Unsupported("GPU col2im supports equal strides and paddings in both directions")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if col.shape != (n, c * kh * kw, ho * wo):
        raise ValueError(f"col2im: col shape {col.shape} does not match {(n, c * kh * kw, ho * wo)}")
    x = cp.empty((n, c, h, w), dtype=col.dtype)
    if x.size:
        _launch(f"col2im_NCHW_{_suffix(col.dtype)}", _grid_planes(n * c, h * w),
                (col, x, n, c, h, w, kh, kw, sh, ph, ho, wo), _device_index(col))
    return x


def _bf16_mode(dtype) -> bool:
    return dtype == np.float32 and precision.get_precision() == "bf16"


def _gemm_operand(a):
    """GEMM operand in the mode's storage: bf16 bits in bf16 mode, else the array itself."""
    return float_to_bf16(a) if _bf16_mode(a.dtype) else a


# --- convolution ---------------------------------------------------------------------------------------

def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _square(stride, padding) -> tuple[int, int]:
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if sh != sw or ph != pw:
        raise Unsupported("GPU convolutions take equal strides and paddings in both directions")
    return sh, ph


def _is_pointwise(kh: int, kw: int, stride: int, padding: int) -> bool:
    return kh == 1 and kw == 1 and stride == 1 and padding == 0


def add_channel_bias(y, bias):
    """y[N, C, ...] += bias[C], in place."""
    if bias is None:
        return y
    n, c = y.shape[0], y.shape[1]
    hw = int(np.prod(y.shape[2:], dtype=np.int64))
    bias = _contiguous(bias.astype(y.dtype, copy=False))
    _launch(f"add_channel_bias_NCHW_{_suffix(y.dtype)}", _grid_planes(n * c, hw),
            (y, bias, n * c, c, hw), _device_index(y))
    return y


def channel_sum(x):
    """Sum over every axis but 1 of an [N, C, ...] array (conv bias gradient), deterministic."""
    x = _contiguous(x)
    n, c = x.shape[0], x.shape[1]
    hw = int(np.prod(x.shape[2:], dtype=np.int64))
    splits = _splits(n * hw, c, _device_index(x))
    cp = backend.cupy_module()
    partial = cp.empty((c, splits, 2), dtype=x.dtype)
    _launch(f"channel_partial_sums_NCHW_{_suffix(x.dtype)}", (splits, c), (x, n, c, hw, partial),
            _device_index(x))
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


def _conv2d_winograd(x, weight, bias, y, padding):
    """Winograd F(2x2, 3x3) forward into y (kernels/winograd.cu around one batched GEMM per chunk)."""
    cp = backend.cupy_module()
    n, c, h, w = x.shape
    o = weight.shape[0]
    ho, wo = y.shape[2], y.shape[3]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    tiles = th * tw
    dev = _device_index(x)
    suffix = _suffix(x.dtype)
    u = cp.empty((16, o, c), dtype=x.dtype)
    _launch(f"winograd_filter_transform_{suffix}", _grid_1d(o * c, dev), (weight, u, o, c), dev)
    step = _chunk(n, 16 * (c + o) * tiles * x.dtype.itemsize)
    for n0 in range(0, n, step):
        nb = min(step, n - n0)
        v = cp.empty((16, c, nb * tiles), dtype=x.dtype)
        _launch(f"winograd_input_transform_NCHW_{suffix}", _grid_planes(c, nb * tiles),
                (x[n0:n0 + nb], v, nb, c, h, w, padding, th, tw), dev)
        m = precision.gemm(u, v, mode="fp32")
        del v
        _launch(f"winograd_output_transform_NCHW_{suffix}", _grid_planes(o, nb * tiles),
                (m, bias, y[n0:n0 + nb], nb, o, ho, wo, th, tw), dev)
        del m
    return y


def _conv2d_direct(x, weight, bias, y, s, p):
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = y.shape[2], y.shape[3]
    rows = n * math.ceil(o / DIRECT_OUT_CHANNELS)
    _launch(f"conv2d_direct_NCHW_{_suffix(x.dtype)}", _grid_planes(rows, ho * wo),
            (x, weight, bias, y, n, c, h, w, o, kh, kw, s, p, ho, wo), _device_index(x))
    return y


def _conv2d_weight_grad_winograd(x, gy, padding):
    """Weight gradient of a 3x3 stride-1 conv by Winograd F(3x3, 2x2): one batched GEMM per chunk."""
    cp = backend.cupy_module()
    n, c, h, w = x.shape
    o, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    tiles = th * tw
    dev = _device_index(x)
    suffix = _suffix(x.dtype)
    m = cp.zeros((16, o, c), dtype=x.dtype)
    step = _chunk(n, 16 * (c + o) * tiles * x.dtype.itemsize)
    for n0 in range(0, n, step):
        nb = min(step, n - n0)
        v = cp.empty((16, c, nb * tiles), dtype=x.dtype)
        _launch(f"winograd_input_transform_NCHW_{suffix}", _grid_planes(c, nb * tiles),
                (x[n0:n0 + nb], v, nb, c, h, w, padding, th, tw), dev)
        ug = cp.empty((16, o, nb * tiles), dtype=x.dtype)
        _launch(f"winograd_grad_transform_NCHW_{suffix}", _grid_planes(o, nb * tiles),
                (gy[n0:n0 + nb], ug, nb, o, ho, wo, th, tw), dev)
        precision.gemm(ug, v, trans_b=True, out=m, beta=1.0, mode="fp32")
        del v, ug
    dw = cp.empty((o, c, 3, 3), dtype=x.dtype)
    _launch(f"winograd_weight_output_transform_{suffix}", _grid_1d(o * c, dev), (m, dw, o, c), dev)
    return dw


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """y = conv2d(x, weight) + bias; x [N, C, H, W], weight [O, C, kh, kw] -> y [N, O, HO, WO]."""
    cp = backend.cupy_module()
    x, weight = _contiguous(x), _contiguous(weight)
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {c_w}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise Unsupported("GPU conv2d needs input, weight and bias of one dtype")
    s, p = _square(stride, padding)
    ho, wo = _out_size(h, kh, s, p), _out_size(w, kw, s, p)
    k = c * kh * kw
    y = cp.empty((n, o, ho, wo), dtype=x.dtype)
    path = conv2d_forward_path(c, kh, kw, s, p, x.dtype)
    if path == "direct":
        return _conv2d_direct(x, weight, None if bias is None else _contiguous(bias), y, s, p)
    if path == "winograd":
        return _conv2d_winograd(x, weight, None if bias is None else _contiguous(bias), y, p)
    bf16 = _bf16_mode(x.dtype)
    w_mat = _gemm_operand(weight.reshape(o, k))
    if path == "gemm":
        precision.gemm(w_mat, x.reshape(n, c, h * w), out=y.reshape(n, o, ho * wo))
    else:
        step = _chunk(n, k * ho * wo * (2 if bf16 else x.dtype.itemsize))
        for n0 in range(0, n, step):
            col = im2col(x[n0:n0 + step], (kh, kw), s, p, out_bf16=bf16)
            precision.gemm(w_mat, col, out=y[n0:n0 + step].reshape(-1, o, ho * wo))
            del col
    return add_channel_bias(y, bias)


def conv2d_backward_input(grad_output, weight, x_shape, stride=1, padding=0):
    """Gradient of conv2d with respect to its input: col2im(weight^T @ grad_output)."""
    cp = backend.cupy_module()
    gy, weight = _contiguous(grad_output), _contiguous(weight)
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
    w_mat = _gemm_operand(weight.reshape(o, k))
    gy_mat = _gemm_operand(gy).reshape(n, o, ho * wo)
    if _is_pointwise(kh, kw, s, p):
        gx = cp.empty((n, c, h, w), dtype=gy.dtype)
        precision.gemm(w_mat, gy_mat, trans_a=True, out=gx.reshape(n, c, h * w))
        return gx
    parts = []
    step = _chunk(n, k * ho * wo * gy.dtype.itemsize)
    for n0 in range(0, n, step):
        gcol = precision.gemm(w_mat, gy_mat[n0:n0 + step], trans_a=True)
        parts.append(col2im(gcol, (gcol.shape[0], c, h, w), (kh, kw), s, p))
        del gcol
    return parts[0] if len(parts) == 1 else cp.concatenate(parts, axis=0)


def conv2d_backward_weight(x, grad_output, weight_shape, stride=1, padding=0):
    """Gradient of conv2d with respect to its weight: sum_n grad_output[n] @ im2col(x)[n]^T."""
    cp = backend.cupy_module()
    gy, x = _contiguous(grad_output), _contiguous(x)
    o, c, kh, kw = (int(v) for v in weight_shape)
    n = x.shape[0]
    s, p = _square(stride, padding)
    ho, wo = gy.shape[2], gy.shape[3]
    k = c * kh * kw
    if conv2d_forward_path(c, kh, kw, s, p, x.dtype) == "winograd" and x.dtype == gy.dtype:
        return _conv2d_weight_grad_winograd(x, gy, p)
    bf16 = _bf16_mode(x.dtype)
    gy_mat = _gemm_operand(gy).reshape(n, o, ho * wo)
    gw = cp.zeros((o, k), dtype=x.dtype)
    pointwise = _is_pointwise(kh, kw, s, p)
    step = n if pointwise else _chunk(n, k * ho * wo * (2 if bf16 else x.dtype.itemsize))
    for n0 in range(0, n, step):
        if pointwise:
            col = _gemm_operand(x).reshape(n, c, ho * wo)
        else:
            col = im2col(x[n0:n0 + step], (kh, kw), s, p, out_bf16=bf16)
        for i in range(col.shape[0]):
            precision.gemm(gy_mat[n0 + i], col[i], trans_b=True, out=gw, beta=1.0)
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


def conv_transpose2d_backward_bias(grad_output):
    return channel_sum(grad_output)


# --- pooling -------------------------------------------------------------------------------------------

def _square_pool(kernel_size, stride) -> tuple[int, int]:
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    if kh != kw or sh != sw:
        raise Unsupported("GPU max_pool2d supports square windows and equal strides")
    return kh, sh


def _pool_index_suffix(k: int) -> tuple[str, type]:
    return ("u8", np.uint8) if k * k <= 256 else ("i32", np.int32)


def max_pool2d_forward(x, kernel_size=2, stride=None):
    """-> (y [N, C, HO, WO], index [N, C, HO, WO]): window position i*k + j of each maximum (uint8 when
    k*k <= 256, else int32), the CPU function's format; no padding, floor sizes, first maximum wins."""
    cp = backend.cupy_module()
    x = _contiguous(x)
    k, s = _square_pool(kernel_size, stride)
    n, c, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"max_pool2d: window {k}x{k} larger than input {h}x{w}")
    index_suffix, index_dtype = _pool_index_suffix(k)
    y = cp.empty((n, c, ho, wo), dtype=x.dtype)
    index = cp.empty((n, c, ho, wo), dtype=index_dtype)
    _launch(f"max_pool2d_forward_NCHW_{_suffix(x.dtype)}_{index_suffix}", _grid_planes(n * c, ho * wo),
            (x, y, index, n * c, h, w, k, s, ho, wo), _device_index(x))
    return y, index


def max_pool2d_backward(grad_output, index, x_shape, kernel_size=2, stride=None):
    """Gradient of max_pool2d: each output gradient goes to its window's maximum."""
    cp = backend.cupy_module()
    gy = _contiguous(grad_output)
    k, s = _square_pool(kernel_size, stride)
    index_suffix, index_dtype = _pool_index_suffix(k)
    index = _contiguous(index.astype(index_dtype, copy=False))
    n, c, h, w = (int(v) for v in x_shape)
    ho, wo = gy.shape[2], gy.shape[3]
    name = f"{_suffix(gy.dtype)}_{index_suffix}"
    if k <= s:  # windows do not overlap: a gather writes every input gradient exactly once
        gx = cp.empty((n, c, h, w), dtype=gy.dtype)
        _launch(f"max_pool2d_backward_gather_NCHW_{name}", _grid_planes(n * c, h * w),
                (gy, index, gx, n * c, h, w, k, s, ho, wo), _device_index(gy))
    else:
        gx = cp.zeros((n, c, h, w), dtype=gy.dtype)
        _launch(f"max_pool2d_backward_scatter_NCHW_{name}", _grid_planes(n * c, ho * wo),
                (gy, index, gx, n * c, h, w, k, s, ho, wo), _device_index(gy))
    return gx


# --- batch norm (+ ReLU) -------------------------------------------------------------------------------

def _splits(elements_per_channel: int, channels: int, device_index: int) -> int:
    """Blocks per channel for the per-channel reductions: fill the GPU, keep >= 2048 elements a block."""
    wanted = max(1, (_multiprocessors(device_index) * 8) // max(1, channels))
    return max(1, min(wanted, math.ceil(elements_per_channel / (_BLOCK * 8)), 1024))


def _bn_layout(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, int(np.prod(x.shape[2:], dtype=np.int64))


def _bn_vector(v, dtype):
    return _contiguous(v.astype(dtype, copy=False))


def _bn_batch_stats(x, running_mean=None, running_var=None, momentum=0.1, eps=1e-5):
    """(mean, biased var, invstd) of x per channel; running statistics updated in place when given."""
    cp = backend.cupy_module()
    n, c, hw = _bn_layout(x)
    dev = _device_index(x)
    suffix = _suffix(x.dtype)
    splits = _splits(n * hw, c, dev)
    partial = cp.empty((c, splits, 2), dtype=x.dtype)
    _launch(f"bn_partial_sums_NCHW_{suffix}", (splits, c), (x, n, c, hw, partial), dev)
    mean, var, invstd = (cp.empty(c, dtype=x.dtype) for _ in range(3))
    update = running_mean is not None and running_var is not None
    if update:
        for r in (running_mean, running_var):
            if r.dtype != x.dtype or not r.flags.c_contiguous or r.shape != (c,):
                raise Unsupported("running statistics are not contiguous vectors of the input's dtype")
    _launch(f"bn_finalize_stats_{suffix}", _grid_1d(c, dev),
            (partial, x, c, splits, hw, n * hw, momentum, eps, int(update),
             running_mean if update else None, running_var if update else None, mean, var, invstd), dev)
    return mean, var, invstd


def _bn_apply(x, mean, invstd, gamma, beta, relu=False, want_xhat=False):
    cp = backend.cupy_module()
    n, c, hw = _bn_layout(x)
    y = cp.empty_like(x)
    xhat = cp.empty_like(x) if want_xhat else None
    _launch(f"bn_forward_apply_NCHW_{_suffix(x.dtype)}", _grid_planes(n * c, hw),
            (x, mean, invstd, _bn_vector(gamma, x.dtype), _bn_vector(beta, x.dtype), y, xhat, n, c, hw,
             int(bool(relu))), _device_index(x))
    return y, xhat


def _bn_backward(gy, saved, mean, invstd, gamma, beta, training, relu, saved_is_xhat):
    """(dx, dgamma, dbeta); `saved` is x (or xhat when saved_is_xhat)."""
    cp = backend.cupy_module()
    gy, saved = _contiguous(gy), _contiguous(saved)
    n, c, hw = _bn_layout(saved)
    dev = _device_index(saved)
    suffix = _suffix(saved.dtype)
    gamma = _bn_vector(gamma, saved.dtype)
    beta = gamma if beta is None else _bn_vector(beta, saved.dtype)  # beta only shapes the ReLU mask
    mean = gamma if mean is None else _bn_vector(mean, saved.dtype)  # unused when saved is xhat
    invstd = _bn_vector(invstd, saved.dtype)
    splits = _splits(n * hw, c, dev)
    partial = cp.empty((c, splits, 2), dtype=saved.dtype)
    flags = (int(bool(relu)), int(bool(saved_is_xhat)))
    _launch(f"bn_backward_partial_sums_NCHW_{suffix}", (splits, c),
            (gy, saved, mean, invstd, gamma, beta, n, c, hw) + flags + (partial,), dev)
    sums = cp.ascontiguousarray(partial.sum(axis=1))  # [C, 2] = (sum g, sum g * xhat)
    gx = cp.empty_like(saved)
    _launch(f"bn_backward_apply_NCHW_{suffix}", _grid_planes(n * c, hw),
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
    x = _contiguous(x)
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
    x = _contiguous(x)
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


# --- activations, softmax, cross-entropy ---------------------------------------------------------------

def relu_forward(x):
    cp = backend.cupy_module()
    x = _contiguous(x)
    y = cp.empty_like(x)
    if x.size:
        _launch(f"relu_forward_{_suffix(x.dtype)}", _grid_1d(x.size, _device_index(x)), (x, y, x.size),
                _device_index(x))
    return y


def relu_backward(grad_output, y):
    """Gradient of relu from its OUTPUT y."""
    cp = backend.cupy_module()
    gy, y = _contiguous(grad_output), _contiguous(y)
    gx = cp.empty_like(gy)
    if gy.size:
        _launch(f"relu_backward_{_suffix(gy.dtype)}", _grid_1d(gy.size, _device_index(gy)),
                (y, gy, gx, gy.size), _device_index(gy))
    return gx


def _class_layout(x, axis: int):
    if axis not in (1, -x.ndim + 1) or x.ndim < 2:
        raise ValueError("GPU softmax works along axis 1 of [N, K, ...] arrays")
    n, k = x.shape[0], x.shape[1]
    return n, k, int(np.prod(x.shape[2:], dtype=np.int64))


def softmax(x, axis=1, log=False):
    """softmax (or log_softmax when log) along the class axis 1."""
    cp = backend.cupy_module()
    x = _contiguous(x)
    n, k, hw = _class_layout(x, axis)
    y = cp.empty_like(x)
    if x.size:
        _launch(f"softmax_NKHW_{_suffix(x.dtype)}", _grid_1d(n * hw, _device_index(x)),
                (x, y, n, k, hw, int(bool(log))), _device_index(x))
    return y


def log_softmax(x, axis=1):
    return softmax(x, axis, log=True)


def softmax_backward(grad_output, y, axis=1, log=False):
    """Gradient of softmax (log_softmax when log) from its OUTPUT y."""
    cp = backend.cupy_module()
    gy, y = _contiguous(grad_output), _contiguous(y)
    n, k, hw = _class_layout(y, axis)
    gx = cp.empty_like(y)
    if y.size:
        _launch(f"softmax_backward_NKHW_{_suffix(y.dtype)}", _grid_1d(n * hw, _device_index(y)),
                (y, gy, gx, n, k, hw, int(bool(log))), _device_index(y))
    return gx


def _ce_inputs(logits, target, weight):
    cp = backend.cupy_module()
    logits = _contiguous(logits)
    n, k, hw = _class_layout(logits, 1)
    target = _contiguous(cp.asarray(target).astype(np.int64, copy=False))
    if target.size != n * hw:
        raise ValueError(f"cross_entropy: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if weight is None:
        weight = cp.ones(k, dtype=logits.dtype)
    weight = _contiguous(cp.asarray(weight).astype(logits.dtype, copy=False))
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
        _launch(f"softmax_cross_entropy_forward_NKHW_{_suffix(logits.dtype)}", _grid_1d(n * hw, _device_index(logits)),
                (logits, target, weight, ignore_index, n, k, hw, loss, pixel_weight), _device_index(logits))
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
        scale = _contiguous(gy.reshape(-1))
    elif reduction == "mean":
        if denominator is None:
            raise ValueError("cross_entropy_backward: reduction 'mean' needs the forward's denominator")
        scale = (gy / denominator).reshape(1)
    else:
        scale = gy.reshape(1)
    scale = _contiguous(scale.astype(logits.dtype, copy=False))
    gx = cp.empty_like(logits)
    if gx.size:
        _launch(f"softmax_cross_entropy_backward_NKHW_{_suffix(logits.dtype)}", _grid_1d(n * hw, _device_index(logits)),
                (logits, target, weight, ignore_index, scale, int(per_pixel), n, k, hw, gx), _device_index(logits))
    return gx


# --- optimisers ----------------------------------------------------------------------------------------

def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0, decoupled=False):
    """One fused Adam (AdamW when decoupled) step IN PLACE on param, exp_avg, exp_avg_sq; step >= 1."""
    beta1, beta2 = float(betas[0]), float(betas[1])
    arrays = (param, grad, exp_avg, exp_avg_sq)
    for a in arrays:
        if not a.flags.c_contiguous or a.dtype != param.dtype or a.shape != param.shape:
            raise ValueError("adam_update: param, grad and state must be contiguous arrays of one shape and dtype")
    if param.size:
        dev = _device_index(param)
        _launch(f"adam_update_{_suffix(param.dtype)}", _grid_1d(param.size, dev),
                (param, grad, exp_avg, exp_avg_sq, param.size, float(lr), beta1, beta2, float(eps),
                 float(weight_decay), 1.0 - beta1 ** int(step), 1.0 - beta2 ** int(step), int(bool(decoupled))),
                dev)


def sgd_update(param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
               nesterov=False, first_step=False):
    """One fused SGD step IN PLACE (momentum_buffer may be None when momentum == 0)."""
    if momentum_buffer is None:
        if momentum != 0.0:
            raise ValueError("sgd_update: momentum needs a momentum buffer")
        momentum_buffer = param  # not touched by the kernel when momentum == 0
    if param.size:
        dev = _device_index(param)
        _launch(f"sgd_update_{_suffix(param.dtype)}", _grid_1d(param.size, dev),
                (param, grad, momentum_buffer, param.size, float(lr), float(momentum), float(dampening),
                 float(weight_decay), int(bool(nesterov)), int(bool(first_step))), dev)


# --- FedAvg --------------------------------------------------------------------------------------------

def weighted_sum(arrays, weights, out=None):
    """sum_k weights[k] * arrays[k] in one pass over all K arrays (same shape, dtype and device)."""
    cp = backend.cupy_module()
    arrays = [_contiguous(a) for a in arrays]
    if not arrays:
        raise ValueError("weighted_sum: no arrays")
    first = arrays[0]
    if len(weights) != len(arrays):
        raise ValueError(f"weighted_sum: {len(arrays)} arrays but {len(weights)} weights")
    for a in arrays:
        if a.shape != first.shape or a.dtype != first.dtype or a.device.id != first.device.id:
            raise ValueError("weighted_sum: arrays differ in shape, dtype or device")
    dev = _device_index(first)
    with cp.cuda.Device(dev):
        if out is None:
            out = cp.empty_like(first)
        pointers = cp.asarray(np.array([a.data.ptr for a in arrays], dtype=np.uint64))
        w = cp.asarray(np.asarray(weights, dtype=first.dtype))
        if first.size:
            aligned = all(a.data.ptr % 16 == 0 for a in arrays) and out.data.ptr % 16 == 0
            if first.dtype == np.float32 and aligned:
                name, work = "weighted_sum_vec4_f32", max(1, first.size // 4)
            else:
                name, work = f"weighted_sum_{_suffix(first.dtype)}", first.size
            _launch(name, _grid_1d(work, dev), (pointers, w, len(arrays), out, first.size), dev)
        # keep the pointer table alive until the kernel has consumed it (CuPy frees it stream-ordered)
        del pointers
    return out


def weighted_accumulate(acc, x, weight):
    """acc += weight * x, in place (streaming FedAvg as clients arrive); acc may be float64 for float32 x
    (a float64 running sum without a float64 copy of x)."""
    if acc.shape != x.shape or not acc.flags.c_contiguous:
        raise ValueError("weighted_accumulate: shapes differ or the sum is not contiguous")
    x = _contiguous(x)
    if acc.dtype == x.dtype:
        name = f"weighted_accumulate_{_suffix(acc.dtype)}"
    elif acc.dtype == np.float64 and x.dtype == np.float32:
        name = "weighted_accumulate_f32_to_f64"
    else:
        raise Unsupported(f"weighted_accumulate: {x.dtype} into {acc.dtype}")
    if acc.size:
        dev = _device_index(acc)
        _launch(name, _grid_1d(acc.size, dev), (acc, x, weight, acc.size), dev)
    return acc


# --- dispatch into the array-agnostic CPU code -----------------------------------------------------------

# nfed's CPU modules -> their raw-array functions that this module replaces (same names and signatures).
DISPATCH = {
    "nfed.core.functions.conv": ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
                            "conv2d_backward_bias", "conv_transpose2d_forward", "conv_transpose2d_backward_input",
                            "conv_transpose2d_backward_weight"),
    "nfed.core.functions.pooling": ("max_pool2d_forward", "max_pool2d_backward"),
    "nfed.core.functions.normalization": ("batch_norm_train_forward", "batch_norm_train_backward",
                                     "batch_norm_eval_forward", "batch_norm_eval_backward"),
}

_originals: dict[tuple[str, str], object] = {}


def _dispatching(cpu_function, gpu_function):
    """CPU function whose calls with a CuPy first argument run gpu_function (unless it is Unsupported)."""

    @functools.wraps(cpu_function)
    def op(*args, **kwargs):
        if args and backend.is_gpu_array(args[0]):
            try:
                return gpu_function(*args, **kwargs)
            except Unsupported:
                pass
        return cpu_function(*args, **kwargs)

    op.cpu_function = cpu_function
    op.gpu_function = gpu_function
    return op


def _fused_adam(self, name, p, grad) -> None:
    adam_update(p.data, _contiguous(grad), self._buffer("exp_avg", name, p), self._buffer("exp_avg_sq", name, p),
                self.step_count, self.lr, self.betas, self.eps, self.weight_decay, self.decoupled)


def _fused_sgd(self, name, p, grad) -> None:
    buffer = self._buffer("momentum_buffer", name, p) if self.momentum else None
    sgd_update(p.data, _contiguous(grad), buffer, self.lr, self.momentum, 0.0, self.weight_decay, self.nesterov)


def _fused_update(cpu_update, fused):
    """Optimizer._update that runs `fused` (one kernel per parameter) for float CuPy parameters."""

    @functools.wraps(cpu_update)
    def update(self, name, p, grad):
        data = p.data
        if (backend.is_gpu_array(data) and backend.is_gpu_array(grad) and data.flags.c_contiguous
                and grad.dtype == data.dtype and data.dtype in (np.float32, np.float64)):
            fused(self, name, p, grad)
        else:
            cpu_update(self, name, p, grad)

    return update


def install() -> None:
    """Route nfed's CPU ops and optimiser updates to these GPU implementations for CuPy arrays.

    Wraps the module-level raw-array functions of nfed.core.functions (table DISPATCH) and Adam/SGD._update
    with a type check: NumPy calls are untouched, CuPy calls run here (falling back to the array-agnostic
    code for arguments the GPU path does not handle). Idempotent; `uninstall()` restores the originals.
    """
    import importlib  # noqa: PLC0415

    for module_name, attributes in DISPATCH.items():
        module = importlib.import_module(module_name)
        for attribute in attributes:
            cpu_function = getattr(module, attribute, None)
            if cpu_function is None or (module_name, attribute) in _originals:
                continue
            _originals[(module_name, attribute)] = cpu_function
            setattr(module, attribute, _dispatching(cpu_function, globals()[attribute]))
    optim = importlib.import_module("nfed.core.optim")
    for cls_name, fused in (("Adam", _fused_adam), ("SGD", _fused_sgd)):
        cls = getattr(optim, cls_name, None)
        if cls is None or ("nfed.core.optim", cls_name) in _originals:
            continue
        _originals[("nfed.core.optim", cls_name)] = cls._update
        cls._update = _fused_update(cls._update, fused)


def uninstall() -> None:
    """Undo install()."""
    import importlib  # noqa: PLC0415

    for (module_name, attribute), original in list(_originals.items()):
        module = importlib.import_module(module_name)
        if module_name == "nfed.core.optim":
            getattr(module, attribute)._update = original
        else:
            setattr(module, attribute, original)
        del _originals[(module_name, attribute)]


def installed() -> bool:
    return bool(_originals)
