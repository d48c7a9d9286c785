"""Channels-last views (functions/layout.py) and the ops that must keep or accept that layout."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.functions.layout import (ChannelView, channel_row, concatenate, empty_like_layout, is_channels_last,
                                        to_channels_last, zeros_like_layout)
from nfed.core.functions.normalization import (batch_norm_eval_backward, batch_norm_eval_forward,
                                               batch_norm_train_backward, batch_norm_train_forward)
from nfed.core.functions.pooling import max_pool2d_backward, max_pool2d_forward


def channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def test_channels_last_detection_and_copies():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    cl = channels_last(x)
    assert is_channels_last(cl) and not is_channels_last(x)
    assert not is_channels_last(x[:, :2])  # a strided view is neither
    assert not is_channels_last(np.zeros((2, 1, 4, 5)))  # one channel: plain NCHW serves
    assert not is_channels_last(np.zeros((2, 3)))
    np.testing.assert_array_equal(to_channels_last(x), x)
    assert is_channels_last(to_channels_last(x)) and to_channels_last(cl) is cl
    assert is_channels_last(empty_like_layout(cl, (2, 7, 4, 5))) and not is_channels_last(empty_like_layout(x))
    zeros = zeros_like_layout(cl, (1, 3, 2, 2))
    assert is_channels_last(zeros) and not zeros.any()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 8, 2, 2), (1, 200, 3, 1), (4, 6)])
def test_channel_view_reduces_and_broadcasts_per_channel(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    values = rng.standard_normal(shape[1])
    for a in ([x, channels_last(x)] if len(shape) == 4 else [x]):
        view = ChannelView(a)
        rows = view.view(a)
        axes = tuple(i for i in range(a.ndim) if i != 1)
        np.testing.assert_allclose(view.sums(rows), a.sum(axis=axes), rtol=1e-12)
        scaled = view.wrap(rows * view.per_channel(values))
        bshape = (1, -1) + (1,) * (a.ndim - 2)
        np.testing.assert_allclose(scaled, a * values.reshape(bshape), rtol=1e-12)
        assert is_channels_last(scaled) == is_channels_last(a)
        # an array of the other layout is still read correctly (as a copy)
        other = np.ascontiguousarray(a) if is_channels_last(a) else (channels_last(a) if a.ndim == 4 else a)
        np.testing.assert_allclose(view.sums(view.view(other)), a.sum(axis=axes), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_keeps_channels_last(axis):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    out = concatenate((channels_last(a), channels_last(b)), axis)
    assert is_channels_last(out)
    np.testing.assert_array_equal(out, np.concatenate((a, b), axis=axis))
    plain = concatenate((a, b), axis)
    assert plain.flags.c_contiguous
    np.testing.assert_array_equal(plain, np.concatenate((a, b), axis=axis))


def test_concat_op_and_its_gradient_on_channels_last():
    rng = np.random.default_rng(3)
    a, b = Tensor(channels_last(rng.standard_normal((2, 3, 4, 4))), requires_grad=True), \
        Tensor(channels_last(rng.standard_normal((2, 5, 4, 4))), requires_grad=True)
    out = F.concat([a, b], axis=1)
    assert is_channels_last(out.data)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    np.testing.assert_array_equal(a.grad, g[:, :3])
    np.testing.assert_array_equal(b.grad, g[:, 3:])


def test_batch_norm_on_channels_last_equals_nchw():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 6, 4)) * 2 + 1
    gamma, beta, g = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((3, 5, 6, 4))
    plain = batch_norm_train_forward(x, gamma, beta)
    cl = batch_norm_train_forward(channels_last(x), gamma, beta)
    assert is_channels_last(cl[0]) and is_channels_last(cl[1])
    for p, c in zip(plain, cl):
        np.testing.assert_allclose(c, p, rtol=1e-12, atol=1e-12)
    back = batch_norm_train_backward(channels_last(g), cl[1], gamma, cl[4])
    assert is_channels_last(back[0])
    for p, c in zip(batch_norm_train_backward(g, plain[1], gamma, plain[4]), back):
        np.testing.assert_allclose(c, p, rtol=1e-12, atol=1e-12)
    mean, var = rng.standard_normal(5), rng.random(5) + 0.5
    np.testing.assert_allclose(batch_norm_eval_forward(channels_last(x), gamma, beta, mean, var),
                               batch_norm_eval_forward(x, gamma, beta, mean, var), rtol=1e-12)
    invstd = 1 / np.sqrt(var + 1e-5)
    for p, c in zip(batch_norm_eval_backward(g, x, gamma, mean, invstd),
                    batch_norm_eval_backward(channels_last(g), channels_last(x), gamma, mean, invstd)):
        np.testing.assert_allclose(c, p, rtol=1e-12, atol=1e-12)


def test_max_pool_on_channels_last_equals_nchw():
    rng = np.random.default_rng(5)
    x = np.round(rng.standard_normal((2, 3, 8, 6)), 1)  # rounded: ties, which must go to the first maximum
    out, index = max_pool2d_forward(x)
    cl_out, cl_index = max_pool2d_forward(channels_last(x))
    np.testing.assert_array_equal(cl_out, out)
    np.testing.assert_array_equal(cl_index, index)
    g = rng.standard_normal(out.shape)
    back = max_pool2d_backward(channels_last(g), cl_index, x.shape)
    assert is_channels_last(back)
    np.testing.assert_array_equal(back, max_pool2d_backward(g, index, x.shape))


def test_channel_row_is_np_tile_cast_to_the_dtype():
    values = np.array([0.1, -2.5, 3.0000001], dtype=np.float64)
    row = channel_row(values, 4, np.float32)
    expected = np.tile(values.astype(np.float32), 4)
    assert row.dtype == np.float32 and row.shape == (12,)
    np.testing.assert_array_equal(row, expected)
    assert channel_row(values, 2).dtype == np.float64
