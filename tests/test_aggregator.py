"""FedAvg against hand computations, update validation, server optimisers and the three stop rules."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from nfed.common.errors import CheckpointError, ConfigError
from nfed.federation.aggregator import FedAvgAggregator, fedavg, global_norm, relative_norm_difference, update_problem
from nfed.federation.server_optim import FedAdam, FedAvgM, ServerOptimizer, build_server_optimizer
from nfed.federation.stop_rules import StopRules


def _model(a, b, mean, var):
    return {"conv.weight": np.array(a, dtype=np.float32), "conv.bias": np.array(b, dtype=np.float32),
            "bn.running_mean": np.array(mean, dtype=np.float32),
            "bn.running_var": np.array(var, dtype=np.float32)}


def test_fedavg_matches_hand_computation_weighted_by_samples():
    one = _model([[1.0, 2.0], [3.0, 4.0]], [1.0], [0.0, 1.0], [1.0, 1.0])
    two = _model([[3.0, 6.0], [-1.0, 0.0]], [5.0], [2.0, 3.0], [3.0, 5.0])
    # weights 1 and 3 samples: average = (1*x1 + 3*x2) / 4
    averaged = fedavg([(one, 1), (two, 3)])
    np.testing.assert_allclose(averaged["conv.weight"], [[2.5, 5.0], [0.0, 1.0]])
    np.testing.assert_allclose(averaged["conv.bias"], [4.0])
    # BatchNorm running statistics are averaged too
    np.testing.assert_allclose(averaged["bn.running_mean"], [1.5, 2.5])
    np.testing.assert_allclose(averaged["bn.running_var"], [2.5, 4.0])
    assert averaged["conv.weight"].dtype == np.float32


def test_equal_samples_give_the_plain_mean_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    models = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    counts = [7, 1, 30, 2, 11]
    forward = fedavg(list(zip(models, counts)))
    backward = fedavg(list(zip(models[::-1], counts[::-1])))
    expected = sum(m["w"].astype(np.float64) * n for m, n in zip(models, counts)) / sum(counts)
    np.testing.assert_allclose(forward["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(forward["w"], backward["w"], rtol=1e-6)
    plain = fedavg([(m, 4) for m in models])
    np.testing.assert_allclose(plain["w"], np.mean([m["w"] for m in models], axis=0), rtol=1e-6)


def test_streaming_sum_keeps_one_model_of_memory():
    reference = {"w": np.zeros((4,), np.float32)}
    aggregator = FedAvgAggregator(reference)
    first_sum = None
    for n in range(1, 6):
        assert aggregator.add({"w": np.full(4, float(n), np.float32)}, n, client=f"c{n}")
        first_sum = first_sum if first_sum is not None else aggregator._sum["w"]
        assert aggregator._sum["w"] is first_sum  # accumulated in place, never a list of updates
    assert aggregator.total_samples == 15
    np.testing.assert_allclose(aggregator.finish()["w"], np.full(4, 55 / 15), rtol=1e-6)


@pytest.mark.parametrize("bad, reason", [
    ({"w": np.array([1.0, np.nan], np.float32)}, "NaN"),
    ({"w": np.array([1.0, np.inf], np.float32)}, "NaN or infinite"),
    ({"w": np.zeros(3, np.float32)}, "shape"),
    ({}, "missing"),
    ({"w": np.zeros(2, np.float32), "extra": np.zeros(1, np.float32)}, "unexpected"),
])
def test_bad_update_is_rejected_with_a_logged_reason_and_the_round_goes_on(bad, reason, caplog):
    reference = {"w": np.zeros(2, np.float32)}
    aggregator = FedAvgAggregator(reference)
    with caplog.at_level(logging.WARNING, logger="nfed.federation.aggregator"):
        assert not aggregator.add(bad, 10, client="Bad-gu")
    assert "Bad-gu" in caplog.text and reason in caplog.text
    assert reason in aggregator.rejected["Bad-gu"]
    assert aggregator.add({"w": np.array([2.0, 4.0], np.float32)}, 3, client="Good-gu")
    np.testing.assert_allclose(aggregator.finish()["w"], [2.0, 4.0])
    assert aggregator.accepted == ["Good-gu"]


def test_zero_samples_rejected_and_empty_round_gives_none():
    aggregator = FedAvgAggregator({"w": np.zeros(2, np.float32)})
    assert not aggregator.add({"w": np.ones(2, np.float32)}, 0, client="Empty-gu")
    assert "positive" in aggregator.rejected["Empty-gu"]
    assert aggregator.finish() is None
    assert update_problem({"w": np.ones(2, np.float32)}, {"w": np.zeros(2, np.float32)}) is None


def test_norms():
    old = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}
    new = {"a": np.array([3.0, 1.0], np.float32), "b": np.array([4.0], np.float32)}
    assert global_norm(old) == pytest.approx(5.0)
    assert relative_norm_difference(new, old) == pytest.approx(0.2)
    assert relative_norm_difference(old, old) == 0.0


def test_server_optimisers():
    current = _model([1.0, 1.0], [0.0], [0.0], [1.0])
    averaged = _model([0.0, 2.0], [1.0], [2.0], [3.0])
    # plain FedAvg: the average
    plain = ServerOptimizer().step(current, averaged)
    np.testing.assert_allclose(plain["conv.weight"], [0.0, 2.0])
    # FedAvgM with momentum 0 and lr 1 equals FedAvg; with momentum the second step goes further
    same = FedAvgM(lr=1.0, momentum=0.0).step(current, averaged)
    np.testing.assert_allclose(same["conv.weight"], [0.0, 2.0])
    momentum = FedAvgM(lr=1.0, momentum=0.5)
    first = momentum.step(current, averaged)          # v = [1,-1] -> w = [0, 2]
    second = momentum.step(first, {k: v.copy() for k, v in first.items()})  # v = 0.5*[1,-1] -> [-0.5, 2.5]
    np.testing.assert_allclose(second["conv.weight"], [-0.5, 2.5])
    # statistics always take the plain average, never a momentum step
    np.testing.assert_allclose(second["bn.running_var"], [3.0])
    # FedAdam (no bias correction, betas 0.9/0.99): m = 0.1 * delta, v = 0.01 * delta^2, so the first
    # step is lr * (1 - b1) / sqrt(1 - b2) = lr in the direction of the average
    adam = FedAdam(lr=0.1, tau=1e-9)
    stepped = adam.step(current, averaged)
    np.testing.assert_allclose(stepped["conv.weight"], [0.9, 1.1], rtol=1e-5)
    np.testing.assert_allclose(stepped["bn.running_mean"], [2.0])


def test_server_optimiser_state_round_trips():
    current = {"w": np.ones(3, np.float32)}
    averaged = {"w": np.zeros(3, np.float32)}
    for name in ("fedavg", "fedavgm", "fedadam"):
        original = build_server_optimizer(name)
        original.step(current, averaged)
        restored = build_server_optimizer(name)
        restored.load_state_dict(original.state_dict())
        a = original.step(current, {"w": np.full(3, 0.5, np.float32)})
        b = restored.step(current, {"w": np.full(3, 0.5, np.float32)})
        np.testing.assert_array_equal(a["w"], b["w"])
        assert restored.steps == original.steps == 2
    with pytest.raises(CheckpointError):
        FedAvgM().load_state_dict({"steps": np.asarray(1), "bogus.w": np.zeros(1)})
    with pytest.raises(ConfigError):
        build_server_optimizer("sgd")


def test_stop_rule_norm_difference():
    rules = StopRules(max_rounds=10, eps=1e-3)
    assert rules.check(1, 0.5, None) is None
    reason = rules.check(2, 5e-4, None)
    assert reason is not None and "norm difference" in reason


def test_stop_rule_validation_loss_patience():
    rules = StopRules(max_rounds=10, patience_rounds=2, delta=0.01)
    assert rules.check(1, None, 1.0) is None
    assert rules.check(2, None, 0.9) is None       # improved by 0.1
    assert rules.check(3, None, 0.895) is None     # improved by less than delta: 1 round without
    reason = rules.check(4, None, 0.91)            # 2 rounds without
    assert reason is not None and "validation loss" in reason


def test_stop_rule_round_budget_and_state():
    rules = StopRules(max_rounds=3, eps=1e-9, patience_rounds=5)
    assert rules.check(1, 1.0, 2.0) is None
    assert rules.check(2, 1.0, 3.0) is None
    assert "budget" in rules.check(3, 1.0, 3.0)
    restored = StopRules(max_rounds=3, patience_rounds=5)
    restored.load_state_dict(rules.state_dict())
    assert restored.best_val_loss == 2.0 and restored.rounds_since_best == 2
    with pytest.raises(ConfigError):
        StopRules(max_rounds=0)


def test_norm_difference_rule_compares_trainable_parameters_only():
    from nfed.federation.aggregator import trainable

    old = _model([3.0, 4.0], [0.0], [0.0], [1.0])
    new = _model([3.0, 4.0], [0.0], [5.0], [9.0])   # only the BatchNorm statistics moved
    assert relative_norm_difference(trainable(new), trainable(old)) == 0.0
    assert sorted(trainable(new)) == ["conv.bias", "conv.weight"]


def test_no_stop_rule_fires_or_counts_during_the_warm_up():
    """The demo's seed-2 curve: the loss sits on a plateau in rounds 5-8 while F1 climbs, then falls again."""
    losses = [0.58, 0.48, 0.41, 0.38, 0.376, 0.380, 0.380, 0.383, 0.379, 0.377, 0.36, 0.37, 0.37, 0.37]
    plain = StopRules(max_rounds=20, patience_rounds=3)
    fired = [r for r, loss in enumerate(losses, 1) if plain.check(r, None, loss)]
    assert fired[0] == 8   # without the warm-up the plateau stops the run (best round 5)
    warm = StopRules(max_rounds=20, patience_rounds=3, warmup_rounds=10, eps=1.0)
    reasons = [warm.check(r, 1e-6, loss) for r, loss in enumerate(losses, 1)]
    assert reasons[:10] == [None] * 10                      # neither the norm rule nor the loss rule in the warm-up
    assert reasons[10] is not None and warm.fired == "norm"  # after it, the norm rule (eps 1.0) fires at once
    loss_only = StopRules(max_rounds=20, patience_rounds=3, warmup_rounds=10)
    reasons = [loss_only.check(r, None, loss) for r, loss in enumerate(losses, 1)]
    assert [r for r, why in enumerate(reasons, 1) if why] == [14] and loss_only.fired == "val_loss"
    assert loss_only.best_val_loss == 0.36
    budget = StopRules(max_rounds=3, patience_rounds=1, warmup_rounds=10)
    assert [budget.check(r, None, 1.0) for r in (1, 2, 3)][-1] == "round budget of 3 spent"


def test_fedavg_sums_a_block_at_a_time_bit_identically_to_one_float64_copy(monkeypatch):
    """The CPU running sum goes through a small float64 block (the server's peak memory, issue 26); the result is
    the same float64 sum, bit for bit, as float64(value) * weight added whole, for tensors spanning several
    blocks, a block's exact multiple, a scalar, an empty and a non-contiguous one."""
    import nfed.federation.aggregator as aggregator_module

    monkeypatch.setattr(aggregator_module, "_ACCUMULATE_BLOCK", 64)
    rng = np.random.default_rng(3)
    values = [rng.standard_normal((7, 5, 3)).astype(np.float32), rng.standard_normal(128).astype(np.float32),
              np.float32(rng.standard_normal()) * np.ones((), np.float32), np.zeros((0, 4), np.float32),
              rng.standard_normal((20, 9)).astype(np.float32)[:, ::2]]
    for value in values:
        total = rng.standard_normal(value.shape)
        expected = total + value.astype(np.float64) * 37.0
        aggregator_module._accumulate(total, value, 37.0)
        assert total.dtype == np.float64 and np.array_equal(total, expected)
