"""W-Net-CD structure (46 weighted layers, parameter formula, names) and behaviour (shapes, loss, grads)."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.core import nn
from nfed.core.autograd import Tensor
from nfed.model.wnet import WNetCD, count_parameters, dates_to_channels, parameter_count, weighted_layers


def closed_form_parameters(w: int, k: int) -> int:
    """Trainable parameters derived by hand from ARCHITECTURE.md.

    block(ci, co) = 9 ci co + co (conv1) + 9 co^2 + co (conv2) + 4 co (two BN gamma/beta);
    deconv(ci, co) = 4 ci co + co; conv1x1(ci, co) = ci co + co.
    U-Encoder: e1..e5 (3->w ... 8w->16w), up4 (32w->8w), d4 (24w->8w), up3 (8w->4w), d3 (12w->4w),
    up2 (4w->2w), d2 (6w->2w), up1 (2w->w), d1 (3w->w), head (w->K)   = 8851 w^2 + 318 w + K w + K
    U-Decoder: e1 (K->w), e2..e5, up4 (16w->8w), d4 (16w->8w), ..., d1 (2w->w), head (w->6)
                                                                        = 7574 w^2 + 297 w + 9 K w + 6
    """
    return 16425 * w * w + (615 + 10 * k) * w + k + 6


def _block(ci, co):
    return 9 * ci * co + co + 9 * co * co + co + 4 * co


def test_closed_form_matches_a_layer_by_layer_sum():
    w, k = 5, 2
    c = [w, 2 * w, 4 * w, 8 * w, 16 * w]
    encoder = (_block(3, c[0]) + sum(_block(c[i], c[i + 1]) for i in range(4))
               + 4 * 2 * c[4] * c[3] + c[3] + _block(3 * c[3], c[3])
               + sum(4 * c[i + 1] * c[i] + c[i] + _block(3 * c[i], c[i]) for i in range(3))
               + c[0] * k + k)
    decoder = (_block(k, c[0]) + sum(_block(c[i], c[i + 1]) for i in range(4))
               + sum(4 * c[i + 1] * c[i] + c[i] + _block(2 * c[i], c[i]) for i in range(4))
               + c[0] * 6 + 6)
    assert encoder + decoder == closed_form_parameters(w, k)


def test_study_size_has_46_weighted_layers_and_the_formula_count():
    model = WNetCD(width=64, rng=np.random.default_rng(0))
    layers = weighted_layers(model)
    assert len(layers) == 46
    assert sum(1 for r in layers if r["kind"] == "deconv") == 8
    assert sum(1 for r in layers if r["kernel"] == "1x1") == 2
    assert count_parameters(model) == closed_form_parameters(64, 2) == 67_317_448


@pytest.mark.parametrize("width,classes", [(1, 2), (8, 2), (8, 5), (3, 5)])
def test_parameter_count_formula_holds_for_other_sizes(width, classes):
    model = WNetCD(width=width, classes=classes, rng=np.random.default_rng(0))
    assert count_parameters(model) == closed_form_parameters(width, classes) == parameter_count(width, classes)
    assert len(weighted_layers(model)) == 46


def test_parameter_names_and_pytorch_layouts():
    w = 4
    model = WNetCD(width=w, rng=np.random.default_rng(0))
    params = dict(model.named_parameters())
    state = model.state_dict()
    assert params["encoder.e1.conv1.weight"].shape == (w, 3, 3, 3)
    assert params["encoder.e5.conv2.weight"].shape == (16 * w, 16 * w, 3, 3)
    assert params["encoder.up4.weight"].shape == (32 * w, 8 * w, 2, 2)        # deconv [in, out, kh, kw]
    assert params["encoder.d4.conv1.weight"].shape == (8 * w, 24 * w, 3, 3)
    assert params["encoder.head.weight"].shape == (2, w, 1, 1)
    assert params["decoder.e1.conv1.weight"].shape == (w, 2, 3, 3)
    assert params["decoder.head.bias"].shape == (6,)
    assert "encoder.d1.bn2.running_var" in state and "encoder.d1.bn2.running_var" not in params
    # the siamese branches share one set of weights: there is no second contracting path
    assert not any(name.startswith(("encoder.past", "encoder.current")) for name in state)
    names = [n for n, _ in model.named_parameters()]
    assert names[:6] == ["encoder.e1.conv1.weight", "encoder.e1.conv1.bias", "encoder.e1.bn1.weight",
                         "encoder.e1.bn1.bias", "encoder.e1.conv2.weight", "encoder.e1.conv2.bias"]


def _pair(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    past = rng.random((n, 3, size, size), dtype=np.float32)
    current = rng.random((n, 3, size, size), dtype=np.float32)
    mask = (rng.random((n, size, size)) > 0.7).astype(np.int64) * rng.integers(1, 5, (n, size, size))
    return past, current, mask


def test_forward_shapes_loss_and_every_parameter_gets_a_gradient():
    model = WNetCD(width=2, rng=np.random.default_rng(0))
    past, current, mask = _pair()
    logits, reconstruction = model(past, current)
    assert logits.shape == (2, 2, 32, 32) and reconstruction.shape == (2, 6, 32, 32)
    total, ce, rec = model.loss(past, current, mask)
    assert total.item() == pytest.approx(ce.item() + 0.1 * rec.item(), rel=1e-5)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not np.isfinite(p.grad).all()]
    assert missing == []


def test_lambda_rec_zero_skips_the_decoder():
    model = WNetCD(width=2, lambda_rec=0.0, rng=np.random.default_rng(0))
    past, current, mask = _pair()
    logits, reconstruction = model(past, current)
    assert reconstruction is None
    total, ce, rec = model.loss(past, current, mask)
    assert total.item() == ce.item() and rec.item() == 0.0
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("decoder."))
    assert all(g is not None for n, g in grads.items() if n.startswith("encoder."))


def test_targets_binary_for_two_classes_and_types_for_five():
    mask = np.array([[[0, 1, 2, 4, 255]]])
    assert WNetCD(width=1, classes=2, rng=np.random.default_rng(0)).target(mask).tolist() == [[[0, 1, 1, 1, 1]]]
    assert WNetCD(width=1, classes=5, rng=np.random.default_rng(0)).target(mask).tolist() == [[[0, 1, 2, 4, 4]]]


def test_five_class_model_trains_on_change_types():
    model = WNetCD(width=2, classes=5, rng=np.random.default_rng(0))
    past, current, mask = _pair()
    logits, _ = model(past, current)
    assert logits.shape == (2, 5, 32, 32)
    model.loss(past, current, mask)[0].backward()
    assert model.encoder.head.weight.grad.shape == (5, 2, 1, 1)


def test_predict_uses_eval_mode_without_touching_state_or_mode():
    model = WNetCD(width=2, rng=np.random.default_rng(0))
    past, current, _ = _pair()
    before = model.state_dict()
    classes = model.predict(past, current)
    assert classes.shape == (2, 32, 32) and classes.dtype == np.int64 and set(np.unique(classes)) <= {0, 1}
    assert model.training
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])       # running statistics not updated
    model.eval()
    logits, _ = model(past, current)
    np.testing.assert_array_equal(classes, logits.data.argmax(axis=1))


def test_dates_to_channels_forward_and_backward():
    x = Tensor(np.arange(2 * 2 * 3 * 1 * 1, dtype=np.float64).reshape(4, 3, 1, 1), requires_grad=True)
    y = dates_to_channels(x)
    assert y.shape == (2, 6, 1, 1)
    np.testing.assert_array_equal(y.data[:, :3], x.data[:2])
    np.testing.assert_array_equal(y.data[:, 3:], x.data[2:])
    weights = np.random.default_rng(1).standard_normal(y.shape)
    (y * Tensor(weights)).sum().backward()
    np.testing.assert_array_equal(x.grad, np.concatenate([weights[:, :3], weights[:, 3:]], axis=0))


@pytest.mark.parametrize("lambda_rec,width,size,prefix", [(0.0, 2, 32, "encoder."), (1.0, 1, 64, "decoder.")])
def test_gradient_matches_finite_differences_in_float64(lambda_rec, width, size, prefix):
    """Directional derivative of the whole loss (U-Encoder; U-Decoder through the reconstruction term).

    Sizes keep level 5 at >= 2x2 pixels: BatchNorm over a single pixel is degenerate. At initialisation
    the U-Decoder's input (softmax) is nearly uniform, so its first layers sit near ReLU/max-pool kinks
    where finite differences are unreliable; the decoder check therefore uses w = 1 on 64x64 tiles.
    """
    model = WNetCD(width=width, lambda_rec=lambda_rec, rng=np.random.default_rng(3))
    for module in model.modules():
        for p in module._parameters.values():
            p.data = p.data.astype(np.float64)
        for name, b in list(module._buffers.items()):
            module._buffers[name] = b.astype(np.float64)
    rng = np.random.default_rng(4)
    past, current, mask = (a.astype(np.float64) if a.dtype.kind == "f" else a for a in _pair(1, size, 5))
    params = [p for name, p in model.named_parameters() if name.startswith(prefix)]
    directions = [rng.standard_normal(p.shape) for p in params]

    def loss_value():
        return model.loss(past, current, mask)[0]

    loss_value().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, directions))
    eps = 1e-6
    originals = [p.data.copy() for p in params]
    for p, d, o in zip(params, directions, originals):
        p.data = o + eps * d
    plus = loss_value().item()
    for p, d, o in zip(params, directions, originals):
        p.data = o - eps * d
    minus = loss_value().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_bad_inputs_are_rejected():
    model = WNetCD(width=1, rng=np.random.default_rng(0))
    past, current, _ = _pair(1, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(past[:, :, :24, :24], current[:, :, :24, :24])
    with pytest.raises(ValueError, match="same shape"):
        model(past, current[:, :, :16, :16])
    with pytest.raises(ValueError, match="classes"):
        WNetCD(width=1, classes=3)
    assert isinstance(model, nn.Module)
