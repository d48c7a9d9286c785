"""Convolution kernels for NumPy arrays over channels-last images (layout.py); conv.py routes to them.

Stride 1, any kernel and padding: the input is zero-padded once into NHWC memory, then each block of output
rows copies its patch rows and multiplies them by the weights in one product,
    patches [pixels / k, kh * (kw + k - 1) * C] @ packed weights [kh * (kw + k - 1) * C, k * O],
whose result rows are already the NHWC output. OpenBLAS runs such tall-by-narrow products slowly when the
narrow side is only 8 columns wide, so layers with few output channels let k neighbouring pixels share one
patch row ("packing", up to PACKED_COLUMNS wide): a wider product that also copies fewer patch values per pixel.
Backward takes ONE patch matrix of the zero-padded output gradient per block for both gradients: times the
packed flipped kernel it is the input gradient, and the input rows (transposed) times it is the flipped
kernel's gradient, summed block by block in a fixed order (the same result whatever thread ran which block).
3x3 layers with many channels take Winograd F(2x2, 3x3) instead for the forward and the input gradient
(winograd_cpu.py).

Non-overlapping patches (stride = kernel, no padding: the W-Net's 2x2 deconvolutions and their adjoints)
are a permutation of the image ("patchify") and its inverse; 1x1 kernels are plain products per image and
return NCHW planes, which the losses and softmax after the W-Net's heads reduce over fastest.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from numpy.lib.stride_tricks import as_strided

from nfed.core.functions import winograd_cpu
from nfed.core.functions.layout import channel_row, from_nhwc, is_channels_last, nhwc
from nfed.core.functions.parallel import num_workers, run_blocks, single_threaded_blas

# Zero-bordered scratch arrays kept per thread (see zero_bordered).
SCRATCH_BYTES = 64 << 20
_scratch = threading.local()

# Bytes of patch rows per block: large enough that OpenBLAS's packing of the weights (up to a few hundred KiB a
# product) is spread over many rows (4 MiB measured best: 1 MiB cost 10 % more at w16/128), small enough for
# several blocks per worker. Blocks run on the worker pool (parallel.py); below PARALLEL_MIN_WORK multiply-adds
# an op runs on the calling thread (a hand-off costs tens of microseconds).
PATCH_BLOCK_BYTES = 4 << 20
PARALLEL_MIN_WORK = 1 << 22
PARALLEL_MIN_COPY = 1 << 18  # values from which padded_nhwc copies on the pool
PACKED_COLUMNS = 16


def pixels_per_row(width: int, out_channels: int, kw: int) -> int:
    """How many neighbouring output pixels share a patch row: doubled while the product is narrower than
    PACKED_COLUMNS and the row width divides (1 for 1-wide kernels, which share no input columns)."""
    k = 1
    while kw > 1 and k * out_channels < PACKED_COLUMNS and width % (2 * k) == 0:
        k *= 2
    return k


def padded_nhwc(x, ph: int, pw: int, dtype=None):
    """NCHW-shaped x (either layout) in a zero_bordered [N, H + 2ph, W + 2pw, C] scratch array (copied by image
    blocks on the worker pool when big)."""
    n, c, h, w = x.shape
    out = zero_bordered((n, h, w, c), (ph, pw), x.dtype if dtype is None else dtype)
    dst, src = inside(out, (n, h, w, c)), nhwc(x)
    if x.size < PARALLEL_MIN_COPY or n < 2:
        dst[...] = src
        return out
    per = -(-n // (2 * num_workers()))

    def copy(i0):
        dst[i0:i0 + per] = src[i0:i0 + per]

    run_blocks(copy, range(0, n, per))
    return out


def zero_bordered(shape, padding: tuple[int, int], dtype):
    """An [N, H + 2ph, W + 2pw, C] scratch array for an [N, H, W, C] shape: zero border, inside left to fill.

    Scratch: one per shape and thread, reused from call to call (only its inside is ever written, so the
    border is zeroed once), up to SCRATCH_BYTES in all. Callers use it within the call and never keep it.
    """
    n, h, w, c = shape
    ph, pw = padding
    full = (n, h + 2 * ph, w + 2 * pw, c)
    cache = _scratch.__dict__.setdefault("bordered", OrderedDict())
    key = (full, ph, pw, np.dtype(dtype).str)  # same full shape and border: the same inside
    out = cache.pop(key, None)
    if out is None:
        out = np.zeros(full, dtype=dtype)
        while cache and sum(a.nbytes for a in cache.values()) + out.nbytes > SCRATCH_BYTES:
            cache.popitem(last=False)
    cache[key] = out
    return out


def inside(bordered, shape):
    """The [N, H, W, C] inside of a zero_bordered array (a view)."""
    n, h, w, c = shape
    ph, pw = (bordered.shape[1] - h) // 2, (bordered.shape[2] - w) // 2
    return bordered[:, ph:ph + h, pw:pw + w]


def packed_weight(w, k: int, dtype):
    """[O, C, kh, kw] -> [kh * (kw + k - 1) * C, k * O]: column block p holds the kernel shifted p pixels."""
    o, c, kh, kw = w.shape
    if k == 1:
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=dtype).reshape(kh * kw * c, o)
    packed = np.zeros((kh, kw + k - 1, c, k, o), dtype=dtype)
    taps = w.transpose(2, 3, 1, 0)
    for p in range(k):
        packed[:, p:p + kw, :, p, :] = taps
    return packed.reshape(kh * (kw + k - 1) * c, k * o)


def fold_packed_grad(packed, k: int, w_shape, channels_first: bool = True):
    """The adjoint of packed_weight: sum the k shifted copies of a [kh * (kw + k - 1) * A, k * B] gradient back
    into [B, A, kh, kw] (channels_first: A = C, B = O) or [A, B, kh, kw]."""
    o, c, kh, kw = w_shape
    a, b = (c, o) if channels_first else (o, c)
    blocks = packed.reshape(kh, kw + k - 1, a, k, b)
    total = blocks[:, 0:kw, :, 0, :].copy()
    for p in range(1, k):
        total += blocks[:, p:p + kw, :, p, :]
    return total.transpose(3, 2, 0, 1).copy() if channels_first else total.transpose(2, 3, 0, 1).copy()


def row_blocks(n: int, rows: int, row_bytes: int, work: int) -> list[tuple[int, int, int, int]]:
    """(first image, end image, first row, end row) blocks of about PATCH_BLOCK_BYTES, either whole images or
    rows of one image, and at least two per worker when the op is big enough to run in parallel."""
    count = max(1, -(-n * rows * row_bytes // PATCH_BLOCK_BYTES))
    if work >= PARALLEL_MIN_WORK:
        count = max(count, min(n * rows, 2 * num_workers()))
    if count <= n:
        images = -(-n // count)
        return [(i, min(n, i + images), 0, rows) for i in range(0, n, images)]
    per = -(-rows // -(-count // n))
    return [(i, i + 1, r, min(rows, r + per)) for i in range(n) for r in range(0, rows, per)]


def _map(task, blocks, work: int) -> list:
    """[task(block) ...]: on the worker pool when worth it, else here; BLAS single-threaded either way."""
    if work >= PARALLEL_MIN_WORK and len(blocks) > 1:
        return run_blocks(task, blocks)
    with single_threaded_blas():
        return [task(block) for block in blocks]


def _patch_rows(xpad, block, kh: int, kw: int, k: int, wo: int):
    """Patch matrix of one block: row (image, row, pixel group) = kh runs of (kw + k - 1) * C values."""
    i0, i1, r0, r1 = block
    c = xpad.shape[3]
    s0, s1, s2, s3 = xpad.strides
    view = as_strided(xpad[i0:, r0:], (i1 - i0, r1 - r0, wo // k, kh, (kw + k - 1) * c),
                      (s0, s1, k * s2, s1, s3))
    return view.reshape(-1, kh * (kw + k - 1) * c)


def _output_rows(a, block, k: int):
    i0, i1, r0, r1 = block
    return a[i0:i1, r0:r1].reshape(-1, k * a.shape[3])


def conv_forward(x, w, b, padding: tuple[int, int]):
    """Stride-1 conv2d of NCHW-shaped x (either layout) -> channels-last [N, O, Ho, Wo]."""
    dtype = np.result_type(x.dtype, w.dtype)
    out, _ = padded_conv(padded_nhwc(x, padding[0], padding[1], dtype), w, b)
    return from_nhwc(out)


def padded_conv(xpad, w, b, epilogue=None):
    """Stride-1 conv2d of an already padded NHWC input -> ([N, Ho, Wo, O] output, per-block epilogue results).

    epilogue(rows), if given, runs on each block's output as image rows [rows, Wo * O] right after its product,
    while they are in cache; its results come back in block order.
    """
    n, hp, wp, c = xpad.shape
    o, _, kh, kw = w.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    if winograd_cpu.applies(w.shape, n, ho, wo):
        out = np.empty((n, ho, wo, o), dtype=xpad.dtype)
        return out, winograd_cpu.conv(xpad, winograd_cpu.filter_transform(w, xpad.dtype), out, b, epilogue)
    k = pixels_per_row(wo, o, kw)
    weights = packed_weight(w, k, xpad.dtype)
    bias = None if b is None else channel_row(b, k, xpad.dtype)
    out = np.empty((n, ho, wo, o), dtype=xpad.dtype)

    def block(item):
        rows = _output_rows(out, item, k)
        np.matmul(_patch_rows(xpad, item, kh, kw, k, wo), weights, out=rows)
        if bias is not None:
            rows += bias
        return None if epilogue is None else epilogue(rows.reshape(-1, wo * o))

    work = n * ho * wo * o * c * kh * kw
    results = _map(block, row_blocks(n, ho, (wo // k) * weights.shape[0] * out.itemsize, work), work)
    return out, results


def gradient_padding(w_shape, padding: tuple[int, int]) -> tuple[int, int]:
    """Zero border around the output gradient that makes the input gradient a stride-1 convolution."""
    return w_shape[2] - 1 - padding[0], w_shape[3] - 1 - padding[1]


def conv_weight_grad(x, gout, w_shape, padding: tuple[int, int]):
    """d(loss)/dw [O, C, kh, kw] of a stride-1 conv2d (the input gradient is conv_forward of the output
    gradient with the flipped kernel)."""
    dtype = np.result_type(x.dtype, gout.dtype)
    gpad = padded_nhwc(gout, *gradient_padding(w_shape, padding), dtype)
    return padded_conv_grads(gpad, w_shape, None, np.ascontiguousarray(nhwc(x), dtype=dtype))[1]


def padded_conv_grads(gpad, w_shape, w=None, x_rows=None):
    """Both gradients of padded_conv from ONE patch matrix of the padded output gradient per block.

    gpad: the output gradient [N, Ho, Wo, O] inside a gradient_padding() zero border. With P a block's patch
    rows of gpad (grouped as pixels of the input), the input gradient is P @ packed(flipped w) (when w is
    given) and the flipped kernel's gradient is x_rows^T @ P (when the input x_rows [N, H, W, C] is given),
    summed over blocks in order, then folded and flipped back.
    Returns (dx [N, H, W, C] or None, dw [O, C, kh, kw] or None).
    """
    o, c, kh, kw = w_shape
    n, hp, wp, _ = gpad.shape
    h, wd = hp - kh + 1, wp - kw + 1
    k = pixels_per_row(wd, c, kw)
    flipped = None if w is None else w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    dx = None if w is None else np.empty((n, h, wd, c), dtype=gpad.dtype)
    weights = None
    if w is not None and winograd_cpu.applies(flipped.shape, n, h, wd):
        winograd_cpu.conv(gpad, winograd_cpu.filter_transform(flipped, gpad.dtype), dx)
    elif w is not None:
        weights = packed_weight(flipped, k, gpad.dtype)
    if weights is None and x_rows is None:
        return dx, None

    def block(item):
        patches = _patch_rows(gpad, item, kh, kw, k, wd)
        if weights is not None:
            np.matmul(patches, weights, out=_output_rows(dx, item, k))
        return None if x_rows is None else np.matmul(_output_rows(x_rows, item, k).T, patches)

    width = kh * (kw + k - 1) * o
    work = n * h * wd * o * c * kh * kw * ((weights is not None) + (x_rows is not None))
    parts = _map(block, row_blocks(n, h, (wd // k) * width * gpad.itemsize, work), work)
    if x_rows is None:
        return dx, None
    flipped_grad = fold_packed_grad(sum_in_order(parts).T, k, w_shape, channels_first=False)
    return dx, flipped_grad[:, :, ::-1, ::-1].copy()


# --- non-overlapping patches (stride = kernel, no padding) ------------------------------------------------

def _image_blocks(x_shape, itemsize: int, work: int):
    """Blocks of whole images, about PATCH_BLOCK_BYTES of patch rows each."""
    n, c, h, w = x_shape
    return [(i0, i1) for i0, i1, _, _ in row_blocks(n, 1, c * h * w * itemsize, work)]


def patchify(x, kh: int, kw: int, dtype=None):
    """NCHW-shaped x (either layout, H and W multiples of the kernel) -> [N * H/kh * W/kw, kh * kw * C]."""
    n, c, h, w = x.shape
    tiles = nhwc(x).reshape(n, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(tiles, dtype=dtype).reshape(-1, kh * kw * c)


def unpatchify(rows, out, kh: int, kw: int, bias=None):
    """The inverse of patchify into `out`, an [N, H, W, C] array: out = rows' tiles (+ bias[C])."""
    n, h, w, c = out.shape
    dst = out.reshape(n, h // kh, kh, w // kw, kw, c)
    tiles = rows.reshape(n, h // kh, w // kw, kh, kw, c).transpose(0, 1, 3, 2, 4, 5)
    if bias is None:
        dst[...] = tiles
    else:
        np.add(tiles, bias, out=dst)


def _pixel_rows(a, dtype):
    """[N * H * W, C] rows of an NCHW-shaped array (a view when it is channels-last)."""
    return np.ascontiguousarray(nhwc(a), dtype=dtype).reshape(-1, a.shape[1])


def patch_forward(x, w, b):
    """conv2d with stride = kernel and no padding -> channels-last [N, O, H/kh, W/kw]."""
    n, _, h, wd = x.shape
    o, c, kh, kw = w.shape
    dtype = np.result_type(x.dtype, w.dtype)
    taps = np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=dtype).reshape(kh * kw * c, o)
    bias = None if b is None else b.astype(dtype, copy=False)
    out = np.empty((n, h // kh, wd // kw, o), dtype=dtype)

    def block(item):
        i0, i1 = item
        rows = out[i0:i1].reshape(-1, o)
        np.matmul(patchify(x[i0:i1], kh, kw, dtype), taps, out=rows)
        if bias is not None:
            rows += bias

    work = x.size * o
    _map(block, _image_blocks(x.shape, out.itemsize, work), work)
    return from_nhwc(out)


def patch_input_grad(gout, w, x_shape, b=None):
    """The adjoint of patch_forward (plus bias[C]): conv2d's input gradient, conv_transpose2d's forward."""
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    dtype = np.result_type(gout.dtype, w.dtype)
    taps = np.ascontiguousarray(w.transpose(0, 2, 3, 1), dtype=dtype).reshape(o, kh * kw * c)
    bias = None if b is None else b.astype(dtype, copy=False)
    out = np.empty((n, h, wd, c), dtype=dtype)

    def block(item):
        i0, i1 = item
        unpatchify(np.matmul(_pixel_rows(gout[i0:i1], dtype), taps), out[i0:i1], kh, kw, bias)

    work = n * h * wd * c * o
    _map(block, _image_blocks(x_shape, out.itemsize, work), work)
    return from_nhwc(out)


def patch_weight_grad(x, gout, w_shape):
    """d(loss)/dw [O, C, kh, kw] of patch_forward."""
    o, c, kh, kw = w_shape
    dtype = np.result_type(x.dtype, gout.dtype)

    def block(item):
        i0, i1 = item
        return np.matmul(patchify(x[i0:i1], kh, kw, dtype).T, _pixel_rows(gout[i0:i1], dtype))

    work = x.size * o
    grad = sum_in_order(_map(block, _image_blocks(x.shape, np.dtype(dtype).itemsize, work), work))
    return grad.reshape(kh, kw, c, o).transpose(3, 2, 0, 1).copy()


def sum_in_order(parts):
    """Sum of per-block partial results, always in block order (deterministic whatever thread ran what)."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


# --- 1x1 kernels --------------------------------------------------------------------------------------------

def _planes(x):
    """[N, C, H * W] view of an NCHW-shaped array of either layout."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        return nhwc(x).reshape(n, h * w, c).transpose(0, 2, 1)
    return x.reshape(n, c, h * w)


def pointwise_forward(x, w, b):
    """1x1 conv2d -> NCHW planes [N, O, H, W]."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    dtype = np.result_type(x.dtype, w.dtype)
    taps = w.reshape(o, c).astype(dtype, copy=False)
    planes = _planes(x)
    out = np.empty((n, o, h * wd), dtype=dtype)

    def block(item):
        i0, i1 = item
        np.matmul(taps, planes[i0:i1], out=out[i0:i1])
        if b is not None:
            out[i0:i1] += b.astype(dtype, copy=False).reshape(o, 1)

    work = x.size * o
    _map(block, _image_blocks(x.shape, out.itemsize, work), work)
    return out.reshape(n, o, h, wd)


def pointwise_input_grad(gout, w, b=None):
    """d(loss)/dx of a 1x1 conv2d (plus bias[C] for the 1x1 transposed convolution) -> channels-last."""
    n, o, h, wd = gout.shape
    c = w.shape[1]
    dtype = np.result_type(gout.dtype, w.dtype)
    taps = w.reshape(o, c).astype(dtype, copy=False)
    planes = _planes(gout)
    out = np.empty((n, h * wd, c), dtype=dtype)

    def block(item):
        i0, i1 = item
        np.matmul(planes[i0:i1].transpose(0, 2, 1), taps, out=out[i0:i1])
        if b is not None:
            out[i0:i1] += b.astype(dtype, copy=False)

    work = gout.size * c
    _map(block, _image_blocks(gout.shape, out.itemsize, work), work)
    return from_nhwc(out.reshape(n, h, wd, c))


def pointwise_weight_grad(x, gout, w_shape):
    """d(loss)/dw of a 1x1 conv2d: sum over images of gout planes @ x planes^T."""
    gplanes, xplanes = _planes(gout), _planes(x)

    def block(item):
        i0, i1 = item
        return sum_in_order(np.matmul(gplanes[i0:i1], xplanes[i0:i1].transpose(0, 2, 1)))

    work = x.size * gout.shape[1]
    return sum_in_order(_map(block, _image_blocks(x.shape, x.itemsize, work), work)).reshape(w_shape)


# --- entry points by kernel family (conv.py picks the family) ------------------------------------------------

def forward(family: str, x, w, b, padding: tuple[int, int]):
    if family == "pointwise":
        return pointwise_forward(x, w, b)
    if family == "disjoint":
        return patch_forward(x, w, b)
    return conv_forward(x, w, b, padding)


def input_grad(family: str, gout, w, x_shape, b=None):
    """Pointwise and disjoint families (stride 1 is the flipped-kernel forward); b: conv_transpose2d's bias."""
    if family == "pointwise":
        return pointwise_input_grad(gout, w, b)
    return patch_input_grad(gout, w, x_shape, b)


def weight_grad(family: str, x, gout, w_shape, padding: tuple[int, int]):
    if family == "pointwise":
        return pointwise_weight_grad(x, gout, w_shape)
    if family == "disjoint":
        return patch_weight_grad(x, gout, w_shape)
    return conv_weight_grad(x, gout, w_shape, padding)
