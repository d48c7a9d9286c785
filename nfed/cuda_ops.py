"""GPU implementations of nfed's heavy ops on CuPy arrays, with the CPU functions' signatures.

Convolutions are im2col/col2im kernels (kernels/im2col.cu) around cuBLAS GEMMs (nfed.precision.gemm,
which honours the fp32|tf32|bf16 mode); pooling, batch norm (+ fused ReLU), softmax cross-entropy, the
fused Adam/SGD updates and the FedAvg weighted sum are single-pass kernels from kernels/*.cu, compiled
once per process and device by nfed.backend.load_kernel. Every kernel launch goes through `_launch`,
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

from . import backend, precision

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
        "bn_finalize_stats_{t}": "ppiiilddipppp",
        "bn_forward_apply_NCHW_{t}": "pppppp" + "iiii",
        "bn_backward_partial_sums_NCHW_{t}": "pppppp" + "iiiip",
        "bn_backward_apply_NCHW_{t}": "ppppppp" + "iiiiip",
        "channel_partial_sums_NCHW_{t}": "piiip",
    },
    "pooling.cu": {
        "max_pool2d_forward_NCHW_{t}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_gather_NCHW_{t}": "ppp" + "l" + "iiiiii",
        "max_pool2d_backward_scatter_NCHW_{t}": "ppp" + "l" + "iiii",
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
    "fedavg.cu": {
        "weighted_sum_{t}": "ppipl",
        "weighted_sum_vec4_f32": "ppipl",
        "weighted_accumulate_f32": "ppfl",
        "weighted_accumulate_f64": "ppdl",
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
            for suffix in (("f32", "f64") if "{t}" in name else ("",)):
                table[name.format(t=suffix)] = (source, kinds)
    return table


KERNELS: dict[str, tuple[str, str]] = _expand_kernels()

_BLOCK = 256
_MAX_GRID_Y = 65535
_SCALAR_TYPES = {"i": np.int32, "l": np.int64, "f": np.float32, "d": np.float64}


def _suffix(dtype) -> str:
    if dtype == np.float32:
        return "f32"
    if dtype == np.float64:
        return "f64"
    raise TypeError(f"GPU ops support float32 and float64 arrays, got {dtype}")


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
        if kind == "p":
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
        raise ValueError("GPU im2col supports equal strides and paddings in both directions")
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
        raise ValueError("GPU col2im supports equal strides and paddings in both directions")
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
    partial = cp.empty((c, splits), dtype=x.dtype)
    _launch(f"channel_partial_sums_NCHW_{_suffix(x.dtype)}", (splits, c), (x, n, c, hw, partial),
            _device_index(x))
    return partial.sum(axis=1)


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """y = conv2d(x, weight) + bias; x [N, C, H, W], weight [O, C, kh, kw] -> y [N, O, HO, WO]."""
    cp = backend.cupy_module()
    x, weight = _contiguous(x), _contiguous(weight)
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"conv2d: input has {c} channels, weight expects {c_w}")
    s, p = _pair(stride)[0], _pair(padding)[0]
    ho, wo = _out_size(h, kh, s, p), _out_size(w, kw, s, p)
    k = c * kh * kw
    y = cp.empty((n, o, ho, wo), dtype=x.dtype)
    bf16 = _bf16_mode(x.dtype)
    w_mat = _gemm_operand(weight.reshape(o, k))
    if _is_pointwise(kh, kw, s, p):
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
    s, p = _pair(stride)[0], _pair(padding)[0]
    ho, wo = gy.shape[2], gy.shape[3]
    k = c * kh * kw
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


def conv2d_backward_weight(grad_output, x, weight_shape, stride=1, padding=0):
    """Gradient of conv2d with respect to its weight: sum_n grad_output[n] @ im2col(x)[n]^T."""
    cp = backend.cupy_module()
    gy, x = _contiguous(grad_output), _contiguous(x)
    o, c, kh, kw = (int(v) for v in weight_shape)
    n = x.shape[0]
    s, p = _pair(stride)[0], _pair(padding)[0]
    ho, wo = gy.shape[2], gy.shape[3]
    k = c * kh * kw
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
    s, p = _pair(stride)[0], _pair(padding)[0]
    out_shape = (n, c_out, (h - 1) * s - 2 * p + kh, (w - 1) * s - 2 * p + kw)
    y = conv2d_backward_input(x, weight, out_shape, s, p)
    return add_channel_bias(y, bias)


def conv_transpose2d_backward_input(grad_output, weight, stride=2, padding=0):
    """Input gradient of conv_transpose2d: the matching conv2d applied to grad_output."""
    return conv2d_forward(grad_output, weight, None, stride, padding)


def conv_transpose2d_backward_weight(grad_output, x, weight_shape, stride=2, padding=0):
    """Weight gradient of conv_transpose2d ([C_in, C_out, kh, kw]): roles of input and output swapped."""
    return conv2d_backward_weight(x, grad_output, weight_shape, stride, padding)


def conv_transpose2d_backward_bias(grad_output):
    return channel_sum(grad_output)


# --- pooling -------------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size=2, stride=None):
    """-> (y [N, C, HO, WO], argmax int32 plane indices [N, C, HO, WO]); no padding, floor sizes."""
    cp = backend.cupy_module()
    x = _contiguous(x)
    k = _pair(kernel_size)[0]
    s = k if stride is None else _pair(stride)[0]
    n, c, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"max_pool2d: window {k} larger than the input {h}x{w}")
    y = cp.empty((n, c, ho, wo), dtype=x.dtype)
    argmax = cp.empty((n, c, ho, wo), dtype=np.int32)
    _launch(f"max_pool2d_forward_NCHW_{_suffix(x.dtype)}", _grid_planes(n * c, ho * wo),
            (x, y, argmax, n * c, h, w, k, s, ho, wo), _device_index(x))
    return y, argmax


def max_pool2d_backward(grad_output, argmax, x_shape, kernel_size=2, stride=None):
    """Gradient of max_pool2d: grad_output routed to the winning input of each window."""
    cp = backend.cupy_module()
    gy = _contiguous(grad_output)
    k = _pair(kernel_size)[0]
    s = k if stride is None else _pair(stride)[0]
    n, c, h, w = (int(v) for v in x_shape)
    ho, wo = gy.shape[2], gy.shape[3]
    suffix = _suffix(gy.dtype)
    if k <= s:
        gx = cp.empty((n, c, h, w), dtype=gy.dtype)
        _launch(f"max_pool2d_backward_gather_NCHW_{suffix}", _grid_planes(n * c, h * w),
                (gy, argmax, gx, n * c, h, w, k, s, ho, wo), _device_index(gy))
    else:
        gx = cp.zeros((n, c, h, w), dtype=gy.dtype)
        _launch(f"max_pool2d_backward_scatter_NCHW_{suffix}", _grid_planes(n * c, ho * wo),
                (gy, argmax, gx, n * c, h, w, ho, wo), _device_index(gy))
    return gx


# --- batch norm (+ ReLU) -------------------------------------------------------------------------------

def _splits(elements_per_channel: int, channels: int, device_index: int) -> int:
    """Blocks per channel for the per-channel reductions: fill the GPU, keep >= 2048 elements a block."""
    wanted = max(1, (_multiprocessors(device_index) * 8) // max(1, channels))
    return max(1, min(wanted, math.ceil(elements_per_channel / (_BLOCK * 8)), 1024))


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                       relu=False):
    """Batch norm over N, H, W (optionally followed by ReLU) -> (y, mean, invstd).

    Training uses the batch statistics and updates running_mean/running_var IN PLACE (unbiased variance,
    PyTorch semantics); eval uses the running statistics. mean and invstd are what backward needs
    (together with x; y is recomputed there, so the ReLU output is not kept).
    """
    cp = backend.cupy_module()
    x = _contiguous(x)
    n, c = x.shape[0], x.shape[1]
    hw = int(np.prod(x.shape[2:], dtype=np.int64))
    dev = _device_index(x)
    suffix = _suffix(x.dtype)
    gamma = _contiguous(gamma.astype(x.dtype, copy=False))
    beta = _contiguous(beta.astype(x.dtype, copy=False))
    if training:
        if n * hw < 2 and running_var is not None:
            raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got {tuple(x.shape)}")
        splits = _splits(n * hw, c, dev)
        partial = cp.empty((c, splits, 2), dtype=x.dtype)
        _launch(f"bn_partial_sums_NCHW_{suffix}", (splits, c), (x, n, c, hw, partial), dev)
        mean = cp.empty(c, dtype=x.dtype)
        invstd = cp.empty(c, dtype=x.dtype)
        update = running_mean is not None and running_var is not None
        if update and (running_mean.dtype != x.dtype or not running_mean.flags.c_contiguous
                       or running_var.dtype != x.dtype or not running_var.flags.c_contiguous):
            raise TypeError("batch_norm: running statistics must be contiguous arrays of the input's dtype")
        rm = running_mean if update else mean
        rv = running_var if update else invstd
        _launch(f"bn_finalize_stats_{suffix}", _grid_1d(c, dev),
                (partial, x, c, splits, hw, n * hw, momentum, eps, int(update), rm, rv, mean, invstd), dev)
    else:
        mean = _contiguous(running_mean.astype(x.dtype, copy=False))
        invstd = 1.0 / cp.sqrt(running_var.astype(x.dtype, copy=False) + x.dtype.type(eps))
    y = cp.empty_like(x)
    _launch(f"bn_forward_apply_NCHW_{suffix}", _grid_planes(n * c, hw),
            (x, mean, invstd, gamma, beta, y, n, c, hw, int(bool(relu))), dev)
    return y, mean, invstd


def batch_norm_backward(grad_output, x, gamma, beta, mean, invstd, training, relu=False):
    """-> (grad_x, grad_gamma, grad_beta) of batch_norm_forward (with the same relu flag)."""
    cp = backend.cupy_module()
    gy, x = _contiguous(grad_output), _contiguous(x)
    n, c = x.shape[0], x.shape[1]
    hw = int(np.prod(x.shape[2:], dtype=np.int64))
    dev = _device_index(x)
    suffix = _suffix(x.dtype)
    gamma = _contiguous(gamma.astype(x.dtype, copy=False))
    beta = _contiguous(beta.astype(x.dtype, copy=False))
    mean, invstd = _contiguous(mean), _contiguous(invstd)
    splits = _splits(n * hw, c, dev)
    partial = cp.empty((c, splits, 2), dtype=x.dtype)
    _launch(f"bn_backward_partial_sums_NCHW_{suffix}", (splits, c),
            (gy, x, mean, invstd, gamma, beta, n, c, hw, int(bool(relu)), partial), dev)
    sums = cp.ascontiguousarray(partial.sum(axis=1))  # [C, 2] = (sum g, sum g * xhat)
    gx = cp.empty_like(x)
    _launch(f"bn_backward_apply_NCHW_{suffix}", _grid_planes(n * c, hw),
            (gy, x, mean, invstd, gamma, beta, sums, n, c, hw, int(bool(relu)), int(bool(training)), gx), dev)
    return gx, sums[:, 1].copy(), sums[:, 0].copy()


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
    """acc += weight * x, in place (streaming FedAvg as clients arrive)."""
    if acc.shape != x.shape or acc.dtype != x.dtype:
        raise ValueError("weighted_accumulate: shapes or dtypes differ")
    x = _contiguous(x)
    if acc.size:
        dev = _device_index(acc)
        suffix = _suffix(acc.dtype)
        _launch(f"weighted_accumulate_{suffix}", _grid_1d(acc.size, dev), (acc, x, weight, acc.size), dev)
    return acc
