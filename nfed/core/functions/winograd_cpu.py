"""Winograd F(2x2, 3x3) convolution on NumPy arrays over channels-last images (the CPU twin of
kernels/winograd.cu): 3x3 kernels, stride 1, over an already zero-padded input, even output sizes.

Each 2x2 block of output pixels comes from a 4x4 tile of input: V = B^T d B per tile and channel, then the
16 tile positions are 16 matrix products V[p] [tiles, C] @ U[p] [C, O] with U = G w G^T, and the output is
A^T M A. That is 16 multiply-adds per 4 output pixels instead of 36 (2.25x fewer), at the price of the two
transforms: a few NumPy passes over the tiles, which pay off when both channel counts are large (the transforms
cost about 1/C + 1/O of the product per tile; conv_cpu uses it from MIN_CHANNELS input and output channels up and
MIN_TILES tiles; below that the patch-matrix products stay faster). Images go in blocks over
the worker pool like the patch-matrix path.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from nfed.core.functions.layout import channel_row
from nfed.core.functions.parallel import num_workers, run_blocks, single_threaded_blas

# Input and output channels from which a 3x3 layer takes Winograd (forward of W-Net layers on a 2-core Zen 5
# EPYC, against the patch matrix: 128 -> 128 and 384 -> 128 at 16x16 px 30-33 % faster, 64 -> 64 at 32x32 7 %;
# 96 -> 32 at 64x64 42 % slower, 32 -> 64 and 96 -> 32 at 8-16 px 25-100 % slower: with few output channels
# the output transform and the short products cost more than the saved multiplications).
MIN_CHANNELS = 64
# ... and from this many 2x2 output tiles: the 16 products have one row per tile, and OpenBLAS is slow on short
# ones (64 -> 64 channels over 256 tiles, 16 images of 8x8 pixels, ran 1.5x slower than the patch matrix).
MIN_TILES = 512
# Tiles per block (16 * tiles * (C + O) values of transforms in flight) and when blocks go to the pool.
BLOCK_TILES = 1024
PARALLEL_MIN_WORK = 1 << 22

def applies(w_shape, batch: int, out_height: int, out_width: int) -> bool:
    """Whether a valid (already padded) stride-1 convolution with kernel w_shape [O, C, kh, kw], this batch and
    output size takes this path."""
    o, c, kh, kw = w_shape
    return ((kh, kw) == (3, 3) and out_height % 2 == 0 and out_width % 2 == 0 and min(c, o) >= MIN_CHANNELS
            and batch * out_height * out_width // 4 >= MIN_TILES)


def filter_transform(w, dtype):
    """U = G w G^T for every (O, C) pair of a [O, C, 3, 3] kernel, as [16, C, O] (G's entries are 0, +-1/2, 1:
    exact in any float type). Element-wise ops, not BLAS: outside the worker pool BLAS would wake OpenBLAS's
    own threads."""
    taps = np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=dtype)  # [i, j, C, O]
    rows = _g_rows(taps)  # [4, 3, C, O]
    return _g_rows(rows.swapaxes(0, 1)).swapaxes(0, 1).reshape(16, w.shape[1], w.shape[0])


def _g_rows(t):
    """G (rows 1 0 0 / .5 .5 .5 / .5 -.5 .5 / 0 0 1) applied along the first axis (length 3) of t."""
    out = np.empty((4,) + t.shape[1:], dtype=t.dtype)
    out[0] = t[0]
    out[3] = t[2]
    ends = t[0] + t[2]
    np.add(ends, t[1], out=out[1])
    np.subtract(ends, t[1], out=out[2])
    out[1:3] *= 0.5
    return out


def _input_transform(tiles, v):
    """v[4a + b] = (B^T d B)[a, b] for tiles d [T..., 4, 4, C] (rows then columns of B^T = [[1, 0, -1, 0],
    [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])."""
    rows = np.empty((4,) + tiles.shape[:-3] + tiles.shape[-2:], dtype=v.dtype)  # [4, T..., 4, C]
    d = [tiles[..., a, :, :] for a in range(4)]
    np.subtract(d[0], d[2], out=rows[0])
    np.add(d[1], d[2], out=rows[1])
    np.subtract(d[2], d[1], out=rows[2])
    np.subtract(d[1], d[3], out=rows[3])
    for a in range(4):
        t = [rows[a][..., b, :] for b in range(4)]
        np.subtract(t[0], t[2], out=v[4 * a])
        np.add(t[1], t[2], out=v[4 * a + 1])
        np.subtract(t[2], t[1], out=v[4 * a + 2])
        np.subtract(t[1], t[3], out=v[4 * a + 3])


def _output_transform(m, out):
    """out[..., p, :, q, :] = (A^T M A)[p, q] for M [4, 4, T..., O] (A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]);
    out is [n, H/2, 2, W/2, 2, O]."""
    rows = np.empty((2,) + m.shape[1:], dtype=m.dtype)  # [2, 4, T..., O]
    np.add(m[0], m[1], out=rows[0])
    rows[0] += m[2]
    np.subtract(m[1], m[2], out=rows[1])
    rows[1] -= m[3]
    for p in range(2):
        s = rows[p]
        left, right = out[:, :, p, :, 0], out[:, :, p, :, 1]
        np.add(s[0], s[1], out=left)
        left += s[2]
        np.subtract(s[1], s[2], out=right)
        right -= s[3]


def conv(xpad, u, out, bias=None, epilogue=None) -> list:
    """out [N, H, W, O] = the valid 3x3 convolution of the padded NHWC input xpad [N, H + 2, W + 2, C] (+ bias[O])
    with the transformed kernel u (filter_transform). epilogue(rows) runs on each image block's output as image
    rows [rows, W * O] while it is in cache; its results come back in block order."""
    n, hp, wp, c = xpad.shape
    h, w, o = hp - 2, wp - 2, u.shape[2]
    bias = None if bias is None else channel_row(bias, w, out.dtype)
    th, tw = h // 2, w // 2
    s0, s1, s2, s3 = xpad.strides
    images = max(1, BLOCK_TILES // (th * tw))
    blocks = [(i, min(n, i + images)) for i in range(0, n, images)]
    work = n * h * w * c * o * 4
    if work >= PARALLEL_MIN_WORK and len(blocks) < 2 * num_workers() and n > 1:
        per = -(-n // (2 * num_workers()))
        blocks = [(i, min(n, i + per)) for i in range(0, n, per)]

    def block(item):
        i0, i1 = item
        tiles = as_strided(xpad[i0:], (i1 - i0, th, tw, 4, 4, c), (s0, 2 * s1, 2 * s2, s1, s2, s3))
        v = np.empty((16, i1 - i0, th, tw, c), dtype=xpad.dtype)
        _input_transform(tiles, v)
        m = np.matmul(v.reshape(16, -1, c), u).reshape(4, 4, i1 - i0, th, tw, o)
        dst = out[i0:i1]
        _output_transform(m, dst.reshape(i1 - i0, th, 2, tw, 2, o))
        rows = dst.reshape(-1, w * o)
        if bias is not None:
            rows += bias
        return None if epilogue is None else epilogue(rows)

    if work >= PARALLEL_MIN_WORK and len(blocks) > 1:
        return run_blocks(block, blocks)
    with single_threaded_blas():
        return [block(item) for item in blocks]
