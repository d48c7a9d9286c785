"""The NumPy channels-last convolution kernels (functions/conv_cpu.py) against independent oracles.

Pixel packing (k neighbouring pixels per patch row) depends on the row width and the channel counts, so the
cases below are chosen to run k = 1, 2, 4 and 8; every result is also checked for both input layouts,
block splits and thread counts.
"""
from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from test_functions_conv import conv2d_oracle, conv_transpose2d_oracle

from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.functions import conv_cpu, winograd_cpu
from nfed.core.functions.layout import is_channels_last


def channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def weight_grad_oracle(x, g, kh, kw, ph, pw):
    """dw[o, c, i, j] = sum over images and pixels of g[n, o, y, x] * xpad[n, c, y + i, x + j]."""
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(xpad, (kh, kw), axis=(2, 3))  # [N, C, Ho, Wo, kh, kw]
    return np.einsum("noyx,ncyxij->ocij", g, windows)


# (N, C, H, W, O, kernel, padding): packing k of the forward is set by (Wo, O), of the gradients by (W, C).
STRIDE1_CASES = [
    (2, 3, 6, 16, 8, 3, 1),     # forward k = 2, input-gradient k = 8 (3 channels)
    (2, 8, 5, 8, 4, 3, 1),      # forward k = 4
    (1, 16, 4, 4, 16, 3, 1),    # k = 1 both ways
    (3, 4, 7, 6, 5, 3, 0),      # no padding, forward k = 2 of 4 output columns
    (2, 2, 6, 8, 3, 5, 2),      # 5x5 kernel
    (2, 5, 5, 7, 2, (1, 3), (0, 1)),  # rectangular kernel, odd width: no packing
]


@pytest.mark.parametrize("n,c,h,w,o,kernel,padding", STRIDE1_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stride1_forward_and_gradients_match_oracles(n, c, h, w, o, kernel, padding, layout):
    rng = np.random.default_rng(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, kh, kw)), rng.standard_normal(o)
    xin = channels_last(x) if layout == "channels_last" else x
    y = conv_cpu.conv_forward(xin, wt, b, (ph, pw))
    assert is_channels_last(y) or min(y.shape[1:]) == 1
    np.testing.assert_allclose(y, conv2d_oracle(x, wt, b, 1, (ph, pw)), rtol=1e-10, atol=1e-10)
    g = rng.standard_normal(y.shape)
    gin = channels_last(g) if layout == "channels_last" else g
    gpad = conv_cpu.padded_nhwc(gin, *conv_cpu.gradient_padding(wt.shape, (ph, pw)))
    dx, dw = conv_cpu.padded_conv_grads(gpad, wt.shape, wt, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), conv_transpose2d_oracle(g, wt, None, 1, (ph, pw)),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, weight_grad_oracle(x, g, kh, kw, ph, pw), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(conv_cpu.conv_weight_grad(xin, gin, wt.shape, (ph, pw)), dw, rtol=1e-12)


def test_cases_cover_every_packing():
    used = set()
    for _, c, _, w, o, kernel, padding in STRIDE1_CASES:
        kw = kernel if isinstance(kernel, int) else kernel[1]
        pw = padding if isinstance(padding, int) else padding[1]
        used |= {conv_cpu.pixels_per_row(w + 2 * pw - kw + 1, o, kw), conv_cpu.pixels_per_row(w, c, kw)}
    assert {1, 2, 4, 8} <= used


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("channels_first", [True, False])
def test_fold_is_the_adjoint_of_packing(k, channels_first):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, 3, 3))  # [O, C, kh, kw]
    a, b = (2, 3) if channels_first else (3, 2)
    packed = conv_cpu.packed_weight(w if channels_first else w.transpose(1, 0, 2, 3), k, w.dtype)
    assert packed.shape == (3 * (3 + k - 1) * a, k * b)
    other = rng.standard_normal(packed.shape)
    folded = conv_cpu.fold_packed_grad(other, k, w.shape, channels_first)  # [O, C, kh, kw] in both modes
    assert np.isclose((packed * other).sum(), (w * folded).sum(), rtol=1e-12)


def test_patch_rows_match_a_naive_gather():
    rng = np.random.default_rng(2)
    xpad = rng.standard_normal((2, 6, 10, 3))
    kh, kw, k, wo = 3, 3, 4, 8
    block = (1, 2, 1, 3)  # image 1, output rows 1 and 2
    rows = conv_cpu._patch_rows(xpad, block, kh, kw, k, wo)
    expected = [xpad[1, r:r + kh, q * k:q * k + kw + k - 1].reshape(-1) for r in (1, 2) for q in range(wo // k)]
    np.testing.assert_array_equal(rows, np.array(expected))


def test_row_blocks_cover_the_output_once(monkeypatch):
    monkeypatch.setattr(conv_cpu, "PATCH_BLOCK_BYTES", 100)
    for n, rows, row_bytes, work in [(3, 7, 30, 0), (5, 2, 10, 0), (2, 9, 1000, 1 << 30), (4, 4, 1, 0)]:
        seen = np.zeros((n, rows), dtype=int)
        for i0, i1, r0, r1 in conv_cpu.row_blocks(n, rows, row_bytes, work):
            assert i1 - i0 == 1 or (r0, r1) == (0, rows)  # rows of one image, or whole images
            seen[i0:i1, r0:r1] += 1
        assert (seen == 1).all()


def test_block_splits_and_threads_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(3)
    x, wt, g = rng.standard_normal((3, 6, 8, 8)), rng.standard_normal((5, 6, 3, 3)), rng.standard_normal((3, 5, 8, 8))

    def everything():
        gpad = conv_cpu.padded_nhwc(g, 1, 1)
        return (conv_cpu.conv_forward(x, wt, None, (1, 1)),
                *conv_cpu.padded_conv_grads(gpad, wt.shape, wt, np.ascontiguousarray(x.transpose(0, 2, 3, 1))))

    serial = everything()
    monkeypatch.setattr(conv_cpu, "PATCH_BLOCK_BYTES", 1)  # one output row per block
    monkeypatch.setattr(conv_cpu, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(conv_cpu, "PARALLEL_MIN_COPY", 0)  # padded copies by image blocks too
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    for a, c in zip(serial, everything()):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_scratch_borders_stay_zero_across_reuse(monkeypatch):
    first = conv_cpu.zero_bordered((1, 7, 6, 2), (1, 1), np.float64)
    conv_cpu.inside(first, (1, 7, 6, 2))[...] = 1.0
    again = conv_cpu.zero_bordered((1, 7, 6, 2), (1, 1), np.float64)
    assert again is first  # reused, border still zero
    assert again.sum() == 7 * 6 * 2
    wider = conv_cpu.zero_bordered((1, 5, 4, 2), (2, 2), np.float64)  # same full shape, wider border
    assert wider is not first and not wider.any()
    monkeypatch.setattr(conv_cpu, "SCRATCH_BYTES", 0)  # over the cap: a new array drops the older ones
    conv_cpu.zero_bordered((1, 3, 3, 2), (1, 1), np.float64)
    assert conv_cpu.zero_bordered((1, 7, 6, 2), (1, 1), np.float64) is not first


@pytest.mark.parametrize("op,case", [("conv2d", (1, 1, 0)), ("conv2d", (2, 2, 0)), ("conv_transpose2d", (2, 2, 0)),
                                     ("conv2d", (3, 1, 1))])
def test_channels_last_inputs_give_the_nchw_results(op, case):
    """Pointwise, non-overlapping and stride-1 families through the public ops, gradients included."""
    kernel, stride, padding = case
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 6, 8))
    w = rng.standard_normal((3, 4, kernel, kernel) if op == "conv2d" else (4, 3, kernel, kernel))
    b = rng.standard_normal(3)
    results = []
    for xin in (x, channels_last(x)):
        tx, tw, tb = Tensor(xin, requires_grad=True), Tensor(w, requires_grad=True), Tensor(b, requires_grad=True)
        out = getattr(F, op)(tx, tw, tb, stride, padding)
        out.backward(np.linspace(-1, 1, out.size).reshape(out.shape))
        results.append([out.data, tx.grad, tw.grad, tb.grad])
    for plain, cl in zip(*results):
        np.testing.assert_allclose(cl, plain, rtol=1e-12, atol=1e-12)
    assert results[0][0].shape == results[1][0].shape


# --- Winograd F(2x2, 3x3) ------------------------------------------------------------------------------------

def test_winograd_filter_transform_matches_g_w_gt():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 3, 3, 3))
    g = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
    expected = np.einsum("ai,ocij,bj->abco", g, w, g).reshape(16, 3, 5)
    np.testing.assert_allclose(winograd_cpu.filter_transform(w, np.float64), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("n,c,h,w,o", [(2, 3, 6, 8, 4), (3, 5, 4, 4, 2), (1, 2, 2, 10, 3)])
def test_winograd_forward_and_input_gradient_match_oracles(monkeypatch, n, c, h, w, o):
    monkeypatch.setattr(winograd_cpu, "MIN_CHANNELS", 0)  # every 3x3 layer with even sizes
    monkeypatch.setattr(winograd_cpu, "MIN_TILES", 0)
    rng = np.random.default_rng(6)
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, 3, 3)), rng.standard_normal(o)
    assert winograd_cpu.applies(wt.shape, n, h, w)
    y = conv_cpu.conv_forward(channels_last(x), wt, b, (1, 1))
    np.testing.assert_allclose(y, conv2d_oracle(x, wt, b, 1, 1), rtol=1e-10, atol=1e-10)
    g = rng.standard_normal(y.shape)
    gpad = conv_cpu.padded_nhwc(g, 1, 1)
    dx, dw = conv_cpu.padded_conv_grads(gpad, wt.shape, wt, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), conv_transpose2d_oracle(g, wt, None, 1, 1),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, weight_grad_oracle(x, g, 3, 3, 1, 1), rtol=1e-10, atol=1e-10)


def test_winograd_only_for_even_3x3_layers_with_enough_channels_and_tiles():
    assert winograd_cpu.applies((128, 64, 3, 3), 16, 16, 16)
    assert winograd_cpu.applies((64, 384, 3, 3), 8, 16, 16)
    assert not winograd_cpu.applies((32, 96, 3, 3), 8, 64, 64)  # few output channels: patch products are faster
    assert not winograd_cpu.applies((96, 32, 3, 3), 8, 64, 64)  # few input channels
    assert not winograd_cpu.applies((128, 64, 3, 3), 16, 15, 16)  # odd size: no whole 2x2 output tiles
    assert not winograd_cpu.applies((128, 64, 5, 5), 16, 16, 16)
    assert not winograd_cpu.applies((64, 64, 3, 3), 16, 8, 8)  # 256 tiles: too few rows per product


def test_winograd_blocks_on_the_pool_give_the_same_result(monkeypatch):
    monkeypatch.setattr(winograd_cpu, "MIN_CHANNELS", 0)
    monkeypatch.setattr(winograd_cpu, "MIN_TILES", 0)
    rng = np.random.default_rng(7)
    x, wt = rng.standard_normal((5, 4, 6, 6)), rng.standard_normal((3, 4, 3, 3))
    serial = conv_cpu.conv_forward(x, wt, None, (1, 1))
    monkeypatch.setattr(winograd_cpu, "BLOCK_TILES", 1)
    monkeypatch.setattr(winograd_cpu, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    np.testing.assert_allclose(conv_cpu.conv_forward(x, wt, None, (1, 1)), serial, rtol=1e-12, atol=1e-12)
