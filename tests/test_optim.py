"""Optimisers: hand-computed Adam sequence, AdamW, SGD variants, name-keyed state round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nfed.common.errors import CheckpointError
from nfed.core import optim
from nfed.core.nn import Parameter


def _quadratic_run(opt_factory, steps, start=1.0):
    """Minimise p^2 from p=start; returns the sequence of parameter values."""
    p = Parameter(np.array([start]))
    opt = opt_factory([("p", p)])
    values = []
    for _ in range(steps):
        p.grad = 2 * p.data
        opt.step()
        values.append(float(p.data[0]))
    return values, opt


def test_adam_hand_computed_sequence():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    values, _ = _quadratic_run(lambda ps: optim.Adam(ps, lr=lr, betas=(b1, b2), eps=eps), 3)
    # Step 1 by hand: m = 0.2, v = 0.004, mhat = 2, vhat = 4 -> p = 1 - 0.1 * 2 / (2 + 1e-8)
    assert values[0] == pytest.approx(0.9, abs=1e-9)
    p, m, v = 1.0, 0.0, 0.0
    for t in range(1, 4):
        g = 2 * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr / (1 - b1 ** t) * m / (math.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
        assert values[t - 1] == pytest.approx(p, rel=1e-12)


def test_adam_weight_decay_is_l2_and_adamw_is_decoupled():
    lr, wd = 0.1, 0.5
    adam, _ = _quadratic_run(lambda ps: optim.Adam(ps, lr=lr, weight_decay=wd), 1)
    # L2: gradient 2p + wd p = 2.5 -> normalised step of lr
    assert adam[0] == pytest.approx(0.9, abs=1e-9)
    adamw, _ = _quadratic_run(lambda ps: optim.AdamW(ps, lr=lr, weight_decay=wd), 1)
    assert adamw[0] == pytest.approx(1.0 * (1 - lr * wd) - lr, abs=1e-9)


def test_sgd_variants():
    plain, _ = _quadratic_run(lambda ps: optim.SGD(ps, lr=0.1), 2)
    assert plain == pytest.approx([0.8, 0.64])
    momentum, _ = _quadratic_run(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9), 2)
    # buf1 = 2 -> p = 0.8; buf2 = 0.9*2 + 1.6 = 3.4 -> p = 0.46
    assert momentum == pytest.approx([0.8, 0.46])
    nesterov, _ = _quadratic_run(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), 1)
    # g + 0.9 * buf = 2 + 1.8 = 3.8
    assert nesterov == pytest.approx([0.62])
    decayed, _ = _quadratic_run(lambda ps: optim.SGD(ps, lr=0.1, weight_decay=1.0), 1)
    assert decayed == pytest.approx([0.7])


def test_parameters_without_grad_are_left_alone():
    p, q = Parameter(np.ones(2)), Parameter(np.ones(2))
    opt = optim.Adam([("p", p), ("q", q)], lr=0.1)
    p.grad = np.ones(2)
    opt.step()
    np.testing.assert_array_equal(q.data, 1.0)
    assert p.data[0] < 1.0
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("factory,kinds", [
    (lambda ps: optim.Adam(ps, lr=0.05), ("exp_avg", "exp_avg_sq")),
    (lambda ps: optim.AdamW(ps, lr=0.05), ("exp_avg", "exp_avg_sq")),
    (lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9), ("momentum_buffer",)),
])
def test_state_dict_round_trip_continues_identically(factory, kinds):
    def make():
        return [("layer.weight", Parameter(np.linspace(-1, 1, 6).reshape(2, 3).astype(np.float32))),
                ("layer.bias", Parameter(np.ones(2, dtype=np.float32)))]

    def run(params, opt, steps):
        for _ in range(steps):
            for _, p in params:
                p.grad = np.sin(p.data * 3) + p.data
            opt.step()

    params = make()
    opt = factory(params)
    run(params, opt, 3)
    state = opt.state_dict()
    assert state["step"].dtype == np.int64 and int(state["step"]) == 3
    assert set(state) == {"step"} | {f"{k}.{n}" for k in kinds for n in ("layer.weight", "layer.bias")}
    clone_params = [(n, Parameter(p.data.copy())) for n, p in params]
    clone = factory(clone_params)
    clone.load_state_dict(state)
    run(params, opt, 2)
    run(clone_params, clone, 2)
    for (_, a), (_, b) in zip(params, clone_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_load_state_dict_mismatch_errors():
    p = Parameter(np.ones(3))
    opt = optim.Adam([("w", p)])
    state = opt.state_dict()
    bad = dict(state)
    bad["exp_avg.w"] = np.zeros(4)
    with pytest.raises(CheckpointError, match=r"shape mismatch exp_avg\.w"):
        opt.load_state_dict(bad)
    bad = dict(state)
    del bad["exp_avg_sq.w"]
    bad["exp_avg.other"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing exp_avg_sq\.w.*unexpected exp_avg\.other"):
        opt.load_state_dict(bad)


def test_bad_arguments():
    with pytest.raises(ValueError):
        optim.Adam([], lr=0.1)
    with pytest.raises(ValueError):
        optim.SGD([("a", Parameter(np.ones(1))), ("a", Parameter(np.ones(1)))], lr=0.1)
    with pytest.raises(ValueError):
        optim.SGD([("a", Parameter(np.ones(1)))], lr=0.1, nesterov=True)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_against_torch(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4))
    kwargs = {"Adam": dict(lr=0.01, weight_decay=0.1), "AdamW": dict(lr=0.01, weight_decay=0.1),
              "SGD": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)}[name]
    p = Parameter(start.copy())
    opt = getattr(optim, name)([("p", p)], **kwargs)
    tp = torch.tensor(start.copy(), requires_grad=True)
    topt = getattr(torch.optim, name)([tp], **kwargs)
    for step in range(5):
        g = rng.standard_normal((3, 4))
        p.grad = g.copy()
        tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory", [lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1),
                                     lambda ps: optim.SGD(ps, lr=0.01, momentum=0.9)], ids=["adam", "sgd"])
def test_updates_on_the_worker_pool_equal_the_serial_ones(monkeypatch, factory):
    rng = np.random.default_rng(0)
    shapes = [(64, 8, 3, 3), (8,), (3, 5), (128,), (16, 16)]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]

    def run():
        params = [(f"p{i}", Parameter(a.copy())) for i, a in enumerate(start)]
        opt = factory(params)
        for step_grads in grads:
            for (_, p), g in zip(params, step_grads):
                p.grad = g
            opt.step()
        return [p.data for _, p in params]

    serial = run()
    monkeypatch.setattr(optim, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    for a, b in zip(run(), serial):
        np.testing.assert_array_equal(a, b)
