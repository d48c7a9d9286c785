"""Robust aggregators against hand-computed values and independent oracles (NumPy, SciPy), and the caps on
claimed sample counts."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nfed.federation import robust
from nfed.federation.robust import (ClippedFedAvgAggregator, MedianAggregator, MultiKrumAggregator,
                                    TrimmedMeanAggregator, cap_sample_counts)

REFERENCE = {"w": np.zeros(2, np.float32), "bn.running_var": np.ones(1, np.float32)}


def updates(rows, var=1.0):
    """Updates whose 'w' deltas are `rows` (the reference is zero) and whose variance stays `var`."""
    return [{"w": np.asarray(row, np.float32), "bn.running_var": np.full(1, var, np.float32)} for row in rows]


def aggregate(aggregator, rows, counts=None):
    for index, weights in enumerate(updates(rows)):
        assert aggregator.add(weights, (counts or [1] * len(rows))[index], client=f"c{index}")
    return aggregator.finish()


def test_median_by_hand_odd_and_even():
    result = aggregate(MedianAggregator(REFERENCE), [[1, 2], [4, 5], [100, -100]])
    np.testing.assert_array_equal(result["w"], [4, 2])
    result = aggregate(MedianAggregator(REFERENCE), [[1, 2], [4, 5], [100, -100], [6, 0]])
    np.testing.assert_array_equal(result["w"], [5, 1])          # mean of the middle two
    np.testing.assert_array_equal(result["bn.running_var"], [1])


def test_trimmed_mean_by_hand():
    rows = [[1, 10], [2, 20], [3, 30], [4, 40], [1000, -1000]]
    aggregator = TrimmedMeanAggregator(REFERENCE, beta=0.2)      # floor(0.2 * 5) = 1 dropped at each end
    result = aggregate(aggregator, rows)
    np.testing.assert_allclose(result["w"], [3, 20])            # (2+3+4)/3, (10+20+30)/3
    assert aggregator.notes == {"trimmed_per_side": 1}


def test_multi_krum_by_hand():
    rows = [[0, 0], [1, 0], [2, 0], [3, 0], [100, 0]]
    # f = 1: each scored by its n - f - 2 = 2 nearest squared distances: 5, 2, 2, 5, 19013
    aggregator = MultiKrumAggregator(REFERENCE, f=1, m=2)
    result = aggregate(aggregator, rows, counts=[1, 1, 3, 1, 1])
    np.testing.assert_allclose(result["w"], [(1 * 1 + 3 * 2) / 4, 0], rtol=1e-6)
    assert aggregator.notes["selected"] == ["c1", "c2"]
    assert aggregator.notes["scores"] == {"c0": 5.0, "c1": 2.0, "c2": 2.0, "c3": 5.0, "c4": 19013.0}
    default_m = MultiKrumAggregator(REFERENCE, f=1)              # m = n - f = 4: the outlier alone is left out
    np.testing.assert_allclose(aggregate(default_m, rows, counts=[1, 1, 3, 1, 1])["w"], [10 / 6, 0], rtol=1e-6)


def test_multi_krum_lowers_f_when_too_few_updates_arrived():
    aggregator = MultiKrumAggregator(REFERENCE, f=3)
    aggregate(aggregator, [[0, 0], [1, 0], [2, 0], [9, 0]])
    assert aggregator.notes["f"] == 0 and aggregator.notes["f_lowered_from"] == 3


def test_clipped_fedavg_by_hand():
    # delta norms 5, 1, 2: bound = median = 2, so the first is scaled by 2/5
    aggregator = ClippedFedAvgAggregator(REFERENCE, clip_factor=1.0)
    result = aggregate(aggregator, [[3, 4], [0, 1], [0, 2]], counts=[1, 1, 2])
    np.testing.assert_allclose(result["w"], [0.3, 1.65], rtol=1e-6)
    assert aggregator.notes["bound"] == pytest.approx(2.0) and aggregator.notes["clipped"] == {"c0": 2.5}


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_coordinatewise_aggregators_match_numpy_and_scipy(monkeypatch, chunk):
    monkeypatch.setattr(robust, "CHUNK", chunk)        # 7: many slices across array boundaries
    rng = np.random.default_rng(0)
    reference = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=11).astype(np.float32)}
    clients = [{k: (v + rng.normal(scale=0.5, size=v.shape)).astype(np.float32) for k, v in reference.items()}
               for _ in range(9)]
    for aggregator, oracle in ((MedianAggregator(reference), lambda x: np.median(x, axis=0)),
                               (TrimmedMeanAggregator(reference, beta=0.25),
                                lambda x: stats.trim_mean(x, 0.25, axis=0))):
        for index, weights in enumerate(clients):
            aggregator.add(weights, 1, f"c{index}")
        result = aggregator.finish()
        for name, ref in reference.items():
            stacked = np.stack([c[name] for c in clients]).astype(np.float64) - ref
            np.testing.assert_allclose(result[name], (ref + oracle(stacked)).astype(np.float32), rtol=1e-6, atol=1e-6)


def test_krum_distances_match_naive_loops(monkeypatch):
    monkeypatch.setattr(robust, "CHUNK", 5)
    rng = np.random.default_rng(1)
    reference = {"a": rng.normal(size=12).astype(np.float32), "b": rng.normal(size=(2, 3)).astype(np.float32)}
    clients = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in reference.items()} for _ in range(6)]
    aggregator = MultiKrumAggregator(reference, f=1)
    for index, weights in enumerate(clients):
        aggregator.add(weights, 1, f"c{index}")
    flat = [np.concatenate([c[k].astype(np.float64).ravel() for k in reference]) for c in clients]
    naive = np.array([[np.sum((x - y) ** 2) for y in flat] for x in flat])
    np.testing.assert_allclose(aggregator._distances(), naive, rtol=1e-9, atol=1e-9)


def test_robust_aggregators_reject_like_fedavg():
    aggregator = MedianAggregator(REFERENCE)
    bad = updates([[np.nan, 0]])[0]
    assert not aggregator.add(bad, 1, "nan") and "NaN" in aggregator.rejected["nan"]
    assert not aggregator.add(updates([[0, 0]])[0], 0, "zero") and "positive" in aggregator.rejected["zero"]
    assert aggregator.finish() is None


def test_registered_counts_cap_inflated_claims():
    weights, reasons = cap_sample_counts({"Gangnam-gu": 10**12, "Gangdong-gu": 50, "X": "junk"},
                                         {"Gangnam-gu": 2105, "Gangdong-gu": 684})
    assert weights == {"Gangnam-gu": 2105, "Gangdong-gu": 50, "X": "junk"}
    assert reasons == {"Gangnam-gu": "claimed 1000000000000 samples, registered 2105"}
    assert robust.registered_samples()["Gangnam-gu"] == 2105


def test_share_cap_by_hand_and_as_a_property():
    weights, reasons = cap_sample_counts({"a": 10, "b": 10, "c": 10, "d": 1000}, {}, max_share=0.4)
    assert weights == {"a": 10, "b": 10, "c": 10, "d": 20}     # 20 = 0.4 x (30 + 20)
    assert set(reasons) == {"d"}
    assert cap_sample_counts({"a": 10, "b": 30}, {}, max_share=0.5)[0] == {"a": 10, "b": 10}   # only equal fits
    rng = np.random.default_rng(2)
    for _ in range(200):
        claims = {f"d{i}": int(c) for i, c in enumerate(rng.integers(1, 10**6, size=rng.integers(3, 30)))}
        share = float(rng.uniform(0.05, 0.9))
        capped, _ = cap_sample_counts(claims, {}, max_share=share)
        total = sum(capped.values())
        if share * len(claims) > 1.05:
            assert max(capped.values()) <= share * total + 1
        assert all(capped[d] <= claims[d] for d in claims)
