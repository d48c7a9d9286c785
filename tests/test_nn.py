"""nn: registration and dotted names, state_dict round trip and errors, modes, init, layers."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.common.errors import CheckpointError
from nfed.core import functions as F
from nfed.core import nn
from nfed.core.autograd import Tensor


class Block(nn.Module):
    def __init__(self, cin, cout, rng):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, rng=rng)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn1(self.conv1(x)))


class Tiny(nn.Module):
    def __init__(self, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.enc = Block(3, 4, rng)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(4, 2, rng=rng)
        self.head = nn.Sequential(nn.Conv2d(2, 2, 1, rng=rng), nn.ReLU())

    def forward(self, x):
        return self.head(self.up(self.pool(self.enc(x))))


def test_dotted_names_in_assignment_order():
    names = [n for n, _ in Tiny().named_parameters()]
    assert names == ["enc.conv1.weight", "enc.conv1.bias", "enc.bn1.weight", "enc.bn1.bias",
                     "up.weight", "up.bias", "head.0.weight", "head.0.bias"]
    assert [n for n, _ in Tiny().named_buffers()] == ["enc.bn1.running_mean", "enc.bn1.running_var"]
    assert [n for n, _ in Tiny().named_modules()] == ["", "enc", "enc.conv1", "enc.bn1", "enc.act", "pool", "up",
                                                        "head", "head.0", "head.1"]
    assert list(Tiny().state_dict()) == ["enc.conv1.weight", "enc.conv1.bias", "enc.bn1.weight", "enc.bn1.bias",
                                         "enc.bn1.running_mean", "enc.bn1.running_var", "up.weight", "up.bias",
                                         "head.0.weight", "head.0.bias"]


def test_pytorch_default_init_and_shapes():
    conv = nn.Conv2d(16, 8, 3, rng=np.random.default_rng(1))
    assert conv.weight.shape == (8, 16, 3, 3) and conv.weight.dtype == np.float32
    bound = 1 / np.sqrt(16 * 9)
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.weight.data).max() > 0.9 * bound
    assert np.abs(conv.bias.data).max() <= bound
    deconv = nn.ConvTranspose2d(8, 4, rng=np.random.default_rng(2))
    assert deconv.weight.shape == (8, 4, 2, 2)
    assert np.abs(deconv.weight.data).max() <= 1 / np.sqrt(4 * 4)
    bn = nn.BatchNorm2d(5)
    np.testing.assert_array_equal(bn.weight.data, 1)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert nn.Conv2d(2, 2, 1, bias=False).bias is None
    assert len(list(nn.Conv2d(2, 2, 1, bias=False).parameters())) == 1


def test_same_rng_seed_gives_same_weights():
    a, b = Tiny(np.random.default_rng(7)), Tiny(np.random.default_rng(7))
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_round_trip_and_copies():
    source, target = Tiny(np.random.default_rng(1)), Tiny(np.random.default_rng(2))
    source.train()
    source(np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32))  # moves running stats
    state = source.state_dict()
    target.load_state_dict(state)
    for (name, value), (_, other) in zip(state.items(), target.state_dict().items()):
        np.testing.assert_array_equal(value, other, err_msg=name)
    state["enc.conv1.weight"][...] = 0  # a copy: the model is unaffected
    assert np.abs(source.enc.conv1.weight.data).sum() > 0
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    source.eval()
    target.eval()
    np.testing.assert_array_equal(source(x).data, target(x).data)


def test_load_state_dict_errors_name_the_problem():
    model = Tiny()
    state = model.state_dict()
    del state["up.bias"]
    state["extra.weight"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing up\.bias.*unexpected extra\.weight"):
        model.load_state_dict(state)
    model.load_state_dict(state, strict=False)  # tolerated when not strict
    state = model.state_dict()
    state["head.0.weight"] = np.zeros((3, 2, 1, 1), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"shape mismatch head\.0\.weight"):
        model.load_state_dict(state)


def test_train_eval_switches_batch_norm():
    model = Tiny()
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = model.enc.bn1.running_mean.copy()
    model.eval()
    assert not model.training and not model.enc.bn1.training
    model(x)
    np.testing.assert_array_equal(model.enc.bn1.running_mean, before)
    model.train()
    assert model.enc.bn1.training
    model(x)
    assert not np.array_equal(model.enc.bn1.running_mean, before)


def test_backward_reaches_every_parameter_and_zero_grad():
    model = Tiny()
    out = model(np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32))
    F.mse_loss(out, np.zeros(out.shape, dtype=np.float32)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == np.float32, name
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_moves_parameters_and_buffers(device):
    model = Tiny().to(device)
    xp = backend.parse_device(device).xp
    assert all(backend.array_module(p.data) is xp for p in model.parameters())
    assert all(backend.array_module(b) is xp for _, b in model.named_buffers())
    out = model(xp.asarray(np.ones((1, 3, 4, 4), dtype=np.float32)))
    assert backend.array_module(out.data) is xp
    model.to("cpu")
    assert all(isinstance(p.data, np.ndarray) for p in model.parameters())


def test_sequential_and_attribute_rules():
    seq = nn.Sequential(nn.ReLU(), nn.MaxPool2d())
    assert len(seq) == 2 and isinstance(seq[1], nn.MaxPool2d)
    out = seq(Tensor(-np.ones((1, 1, 4, 4))))
    assert out.shape == (1, 1, 2, 2) and out.data.max() == 0
    model = Tiny()
    with pytest.raises(TypeError):
        model.up = 3
    model.scale = 2.0  # plain attributes stay plain
    assert model.scale == 2.0 and "scale" not in dict(model.named_parameters())
    with pytest.raises(AttributeError):
        model.missing
    assert model.num_parameters() == sum(p.size for p in model.parameters())
