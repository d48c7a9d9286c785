"""nfed's W-Net-CD against its PyTorch twin (nfed.benchmarks.torch_twin), same weights: an independent oracle."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.model.wnet import WNetCD, count_parameters
from nfed.training.trainer import TrainConfig, build_model, build_optimizer

torch = pytest.importorskip("torch")
from nfed.benchmarks import torch_twin as twin  # noqa: E402  (imports torch: only once torch is known present)


def _pair(n=2, size=32):
    rng = np.random.default_rng(11)
    return (rng.random((n, 3, size, size), dtype=np.float32), rng.random((n, 3, size, size), dtype=np.float32),
            (rng.random((n, size, size)) > 0.7).astype(np.int64))


def _twins(width=4, classes=2, lambda_rec=0.1):
    ours = WNetCD(width=width, classes=classes, lambda_rec=lambda_rec, rng=np.random.default_rng(0))
    theirs = twin.WNetCD(width, classes, lambda_rec)
    twin.load_nfed_state(theirs, ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("width,classes", [(4, 2), (8, 5)])
def test_same_names_shapes_and_parameter_count(width, classes):
    ours, theirs = _twins(width, classes)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in twin.nfed_state(theirs).items()}
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_forward_matches(training):
    ours, theirs = _twins()
    ours.train(training)
    theirs.train(training)
    past, current, _ = _pair()
    logits, reconstruction = ours(past, current)
    with torch.no_grad():
        t_logits, t_reconstruction = theirs(torch.from_numpy(past), torch.from_numpy(current))
    np.testing.assert_allclose(logits.data, t_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reconstruction.data, t_reconstruction.numpy(), rtol=1e-4, atol=1e-4)
    if training:   # BatchNorm running statistics updated the same way
        state = twin.nfed_state(theirs)
        for name, value in ours.state_dict().items():
            np.testing.assert_allclose(value, state[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_loss_gradients_and_one_adam_step_match():
    config = TrainConfig(width=2, lr=1e-3)
    ours = build_model(config)
    theirs = twin.WNetCD(2, 2, 0.1)
    twin.load_nfed_state(theirs, ours.state_dict())
    optimizer = build_optimizer(ours, config)
    t_optimizer = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    past, current, mask = _pair()
    loss, _, _ = ours.loss(past, current, mask)
    loss.backward()
    t_loss = theirs.loss(torch.from_numpy(past), torch.from_numpy(current), torch.from_numpy(mask))
    t_loss.backward()
    assert loss.item() == pytest.approx(t_loss.item(), rel=1e-5)
    t_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        scale = float(np.abs(t_params[name].grad.numpy()).max())
        np.testing.assert_allclose(p.grad, t_params[name].grad.numpy(), rtol=1e-3,
                                   atol=max(1e-3 * scale, 1e-6), err_msg=name)
    optimizer.step()
    t_optimizer.step()
    state = twin.nfed_state(theirs)
    for name, value in ours.state_dict().items():
        # Adam's first step is about lr * sign(grad): where a gradient is rounding noise (e.g. a conv bias
        # followed by BatchNorm, whose true gradient is zero) the two frameworks may step in opposite
        # directions. So: every element within 2 lr, and almost all of them equal.
        difference = np.abs(value - state[name])
        assert difference.max() <= 2.5 * config.lr, name
        if not name.endswith((".conv1.bias", ".conv2.bias")):
            assert np.mean(difference > 1e-5 + 1e-4 * np.abs(state[name])) < 0.01, name
