"""DP-FedAvg: client clipping, the server's noise statistics, and the privacy accountant against published
values (Balle & Wang 2018's analytic Gaussian mechanism; Abadi et al. 2016's moments-accountant example)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from test_federation import PACKS, FakeTrainConfig, fake_evaluate, fake_train

from nfed.common.errors import ConfigError
from nfed.federation import privacy
from nfed.federation.config import FederationConfig
from nfed.federation.privacy import DPFedAvgAggregator, clip_update, noise_for_epsilon, privacy_spent, update_norm
from nfed.federation.server import federate
from nfed.runs.runfolder import read_rounds

needs_accountant = pytest.mark.skipif(
    __import__("importlib").util.find_spec("dp_accounting") is None,
    reason="dp-accounting is not installed (pip install 'nfed[privacy]'): privacy accounting untested")


def test_clip_update_bounds_the_norm_and_keeps_the_direction():
    reference = {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    weights = {"a": np.array([4, 1, 1], np.float32), "b": np.full((2, 2), 2.0, np.float32)}   # delta norm 5
    clipped, norm_before = clip_update(weights, reference, 2.5)
    assert norm_before == pytest.approx(5.0)
    assert update_norm(clipped, reference) == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [2.5, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], np.full((2, 2), 1.0), rtol=1e-6)
    unchanged, _ = clip_update(weights, reference, 6.0)
    np.testing.assert_array_equal(unchanged["a"], weights["a"])


def test_dp_fedavg_noise_has_the_stated_statistics():
    size, clip, z = 200_000, 0.5, 3.0
    reference = {"w": np.zeros(size, np.float32), "bn.running_var": np.full(size, 0.1, np.float32)}
    rng = np.random.default_rng(7)
    aggregator = DPFedAvgAggregator(reference, clip=clip, noise_multiplier=z, rng=np.random.default_rng(8))
    deltas = []
    for client in range(4):
        delta = rng.normal(size=size)
        delta *= (10.0 if client else 0.1) / np.linalg.norm(delta)   # three clients exceed the bound
        deltas.append(delta)
        assert aggregator.add({"w": delta.astype(np.float32), "bn.running_var": reference["bn.running_var"]},
                              10**6, f"c{client}")
    assert aggregator.notes["clipped_by_server"] == ["c1", "c2", "c3"]
    result = aggregator.finish()
    clipped = sum(d * min(1.0, clip / np.linalg.norm(d)) for d in deltas) / 4   # sample counts do not weigh
    noise = result["w"].astype(np.float64) - clipped
    assert abs(noise.mean()) < 5 * z * clip / 4 / math.sqrt(size)
    assert noise.std() == pytest.approx(z * clip / 4, rel=0.01)
    assert result["bn.running_var"].min() >= 0.0 and (result["bn.running_var"] == 0).any()   # clamped


def test_dp_fedavg_without_noise_is_the_mean_of_clipped_deltas():
    reference = {"w": np.zeros(2, np.float32)}
    aggregator = DPFedAvgAggregator(reference, clip=1.0, noise_multiplier=0.0)
    aggregator.add({"w": np.array([3, 4], np.float32)}, 1, "a")
    aggregator.add({"w": np.array([0, 0.5], np.float32)}, 99, "b")
    np.testing.assert_allclose(aggregator.finish()["w"], [(0.6 + 0) / 2, (0.8 + 0.5) / 2], rtol=1e-6)


def test_train_round_clips_the_update_it_sends(tmp_path):
    from test_flower import make_tiny_packs

    from nfed.federation.client import host_state, make_round_setup, train_round
    from nfed.training.trainer import build_model, profile_config

    packs = make_tiny_packs(tmp_path / "packs", districts=("Gangnam-gu",), counts=((4, 1, 1),))
    config = profile_config("demo", width=4, batch_size=2, lr=0.01)
    start = host_state(build_model(config))
    setup = make_round_setup(config, 1, 1)
    free = train_round(start, setup, packs["Gangnam-gu"])
    bound = update_norm(free.weights, start) / 4
    clipped = train_round(start, {**setup, "dp_clip": bound}, packs["Gangnam-gu"])
    assert update_norm(clipped.weights, start) == pytest.approx(bound, rel=1e-4)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (ICML 2018), Theorem 8: the exact epsilon of a Gaussian mechanism of sensitivity 1."""
    return brentq(lambda eps: norm.cdf(1 / (2 * sigma) - eps * sigma)
                  - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma) - delta, 0, 200)


@needs_accountant
@pytest.mark.parametrize("z, rounds, delta", [(1.0, 10, 1e-5), (5.0, 28, 1 / 356), (0.8, 1, 1e-3)])
def test_accountant_matches_the_analytic_gaussian_mechanism(z, rounds, delta):
    # every district every round: T Gaussian releases compose to one with noise z / sqrt(T)
    assert privacy_spent(z, rounds, 1.0, delta) == pytest.approx(analytic_gaussian_epsilon(z / math.sqrt(rounds),
                                                                                           delta), rel=1e-3)


@needs_accountant
def test_accountant_against_abadi_et_al():
    # "q = 0.01, sigma = 4, delta = 1e-5, T = 10000: epsilon ~ 1.26 with the moments accountant" (Abadi et al.
    # 2016, section 3.1); the privacy loss distribution is tighter than that bound, never looser
    epsilon = privacy_spent(4.0, 10_000, 0.01, 1e-5)
    assert 0.8 < epsilon <= 1.26


@needs_accountant
def test_noise_for_epsilon_inverts_the_accountant():
    z = noise_for_epsilon(4.0, 3, 1.0, 1e-3, tolerance=0.01)
    assert privacy_spent(z, 3, 1.0, 1e-3) <= 4.0 < privacy_spent(z * 0.98, 3, 1.0, 1e-3)
    assert noise_for_epsilon(math.inf, 3, 1.0, 1e-3) == 0.0


@needs_accountant
def test_federation_records_the_privacy_spent_after_every_round(tmp_path):
    config = FederationConfig(rounds=3, eps=0.0, dp_clip=0.5, dp_noise=2.0, dp_delta=1e-4)
    result = federate(PACKS, tmp_path / "run", FakeTrainConfig(), config, train_fn=fake_train,
                      evaluate_fn=fake_evaluate, initial_weights={"w": np.zeros(3, np.float32)})
    records = read_rounds(tmp_path / "run" / "rounds.jsonl")
    epsilons = [r["privacy"]["epsilon"] for r in records]
    assert epsilons == pytest.approx([privacy_spent(2.0, r, 1.0, 1e-4) for r in (1, 2, 3)], rel=1e-9)
    assert all(r["aggregator"] == "dp-fedavg" for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[-1]) and summary["aggregator"] == "dp-fedavg"
    assert result.rounds[-1]["privacy"]["releases"] == 3


def test_dp_without_the_accountant_fails_in_one_line(monkeypatch):
    def missing():
        raise ConfigError("differential privacy needs the dp-accounting package for its privacy accounting: "
                          "pip install 'nfed[privacy]'")

    monkeypatch.setattr(privacy, "_accounting", missing)
    with pytest.raises(ConfigError, match=r"nfed\[privacy\]"):
        federate(PACKS, "/nonexistent/run", FakeTrainConfig(), FederationConfig(dp_clip=1.0, dp_noise=1.0),
                 train_fn=fake_train, evaluate_fn=fake_evaluate, initial_weights={"w": np.zeros(3, np.float32)})


def test_the_report_states_the_privacy_spent(tmp_path):
    from report_runs import districts, make_run

    from nfed.report.build import make_study_report
    from nfed.report.text import summary_lines

    run = make_run(tmp_path / "run", districts())
    summary = tmp_path / "run" / "federated" / "summary.json"
    saved = json.loads(summary.read_text()) if summary.is_file() else {}
    privacy = {"epsilon": 3.5, "delta": 1e-4, "releases": 12, "clip": 0.5, "noise_multiplier": 1.1}
    summary.write_text(json.dumps({**saved, "privacy": privacy}))
    comparison = make_study_report([run], tmp_path / "report")
    assert comparison.summary["privacy"] == privacy
    assert "privacy spent epsilon 3.5 at delta 0.0001 after 12 round(s)" in "\n".join(summary_lines(comparison))
