"""Patch extraction shared by convolution, transposed convolution and pooling (CPU and GPU alike).

Two layouts:
- `im2col`/`col2im`: the classic [N, C*kh*kw, Ho*Wo] patch matrix, for any kernel, stride and padding.
- `padded_rows`/`flat_cols` (stride 1 only): each zero-padded plane is laid out flat with row length Wp,
  so the kernel offset (i, j) is a plain shift by i*Wp + j. Every row of the patch matrix is then one
  contiguous slice of the input (a memcpy-speed copy instead of a strided gather); the output is computed
  on Ho rows of Wp columns and the Wp - Wo columns that straddle the padding are dropped afterwards.
"""
from __future__ import annotations

from nfed.common import backend


def _as_strided(xp, a, shape, strides):
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (floor mode, like PyTorch)."""
    return (size + 2 * padding - kernel) // stride + 1


def padded(x, ph: int, pw: int):
    """x [N, C, H, W] with ph/pw zero rows/columns on each side (x itself when no padding)."""
    if ph == 0 and pw == 0:
        return x
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def im2col(x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Patches of x [N, C, H, W] as cols [N, C*kh*kw, Ho*Wo] (row index = (c, i, j), column = (y, x))."""
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xpad = xp.ascontiguousarray(padded(x, ph, pw))
    s0, s1, s2, s3 = xpad.strides
    view = _as_strided(xp, xpad, (n, c, kh, kw, ho, wo), (s0, s1, s2, s3, s2 * sh, s3 * sw))
    return xp.ascontiguousarray(view).reshape(n, c * kh * kw, ho * wo)


def col2im(cols, x_shape: tuple, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """The adjoint of `im2col`: sums every patch entry back onto the pixel it came from."""
    xp = backend.array_module(cols)
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    cols6 = cols.reshape(n, c, kh, kw, ho, wo)
    if (sh, sw) == (kh, kw) and ph == 0 and pw == 0 and h == ho * kh and w == wo * kw:
        # Non-overlapping patches (e.g. 2x2 stride 2): col2im is a pure permutation.
        return cols6.transpose(0, 1, 4, 2, 5, 3).reshape(n, c, h, w)
    xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xpad[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += cols6[:, :, i, j]
    if ph == 0 and pw == 0:
        return xpad
    return xp.ascontiguousarray(xpad[:, :, ph:ph + h, pw:pw + w])


def padded_rows(x, first: int, count: int, ph: int, pw: int, tail: int):
    """Rows first..first+count-1 of one sample's zero-padded planes (x [C, H, W]), flattened to
    [C, count*Wp + tail] with tail zeros after the last row: the input of `flat_cols` for a block of
    output rows. Built per block, so it is small, reused heap memory and filled by the block's worker."""
    xp = backend.array_module(x)
    c, h, w = x.shape
    wp = w + 2 * pw
    out = xp.zeros((c, count * wp + tail), dtype=x.dtype)
    s1, s2 = out.strides
    planes = _as_strided(xp, out, (c, count, wp), (s1, wp * s2, s2))
    lo, hi = max(first, ph), min(first + count, ph + h)  # padded rows that hold input rows
    if hi > lo:
        planes[:, lo - first:hi - first, pw:pw + w] = x[:, lo - ph:hi - ph]
    return out


def flat_cols(planes, kh: int, kw: int, wp: int, start: int, length: int, out=None):
    """Stride-1 patch matrix [C*kh*kw, length] of one sample's `padded_rows` planes [C, F]: row (c, i, j) is
    planes[c, start + i*wp + j : start + i*wp + j + length] (columns start..start+length of the Ho x Wp grid)."""
    xp = backend.array_module(planes)
    c, size = planes.shape
    if start + length + (kh - 1) * wp + kw - 1 > size:
        raise ValueError("flat_cols: window reaches past the padded planes")
    s1, s2 = planes.strides
    view = _as_strided(xp, planes[:, start:], (c, kh, kw, length), (s1, wp * s2, s2, s2))
    if out is None:
        out = xp.empty((c * kh * kw, length), dtype=planes.dtype)
    out.reshape(c, kh, kw, length)[...] = view
    return out
