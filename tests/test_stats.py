"""nfed.report.stats against numbers worked out by hand and against exact enumeration."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nfed.report.stats import (bootstrap_correlation, least_squares_line, mean_interval, pearson, percentile_interval,
                               resampled_correlations, spearman, strength, wilcoxon_paired)


def test_t_interval_by_hand():
    # mean 2.5, s = sqrt(5/3), s/sqrt(4) = 0.6454972; t(0.975, 3 df) = 3.182446 from a t table
    result = mean_interval([1, 2, 3, 4, math.inf, None])
    assert result["mean"] == pytest.approx(2.5) and result["n"] == 4
    assert result["low"] == pytest.approx(2.5 - 3.182446 * 0.6454972, abs=1e-5)
    assert result["high"] == pytest.approx(2.5 + 3.182446 * 0.6454972, abs=1e-5)
    # two values 0.4 and 0.6: s = 0.1414214, s/sqrt(2) = 0.1, t(0.975, 1 df) = 12.7062
    assert mean_interval([0.4, 0.6])["high"] == pytest.approx(0.5 + 1.270620, abs=1e-5)
    assert mean_interval([0.7]) == {"mean": 0.7, "low": None, "high": None, "n": 1}
    assert mean_interval([])["mean"] is None


def test_wilcoxon_by_hand():
    # differences 1, 2, -3, 4, 5: ranks 1..5, W+ = 12, W- = 3; of the 32 sign patterns 5 have W- <= 3
    # ({}, {1}, {2}, {3}, {1,2}), so the exact two-sided p = 2 * 5/32
    after, before = [1.5, 2.5, 0.5, 5.0, 6.0], [0.5, 0.5, 3.5, 1.0, 1.0]
    result = wilcoxon_paired(after, before)
    assert result["statistic"] == 3.0 and result["p_value"] == pytest.approx(0.3125)
    assert (result["higher"], result["lower"], result["equal"]) == (4, 1, 0)
    assert result["median_difference"] == pytest.approx(2.0)
    # a tie is dropped (zero_method "wilcox"): the same test
    tied = wilcoxon_paired(after + [0.3], before + [0.3])
    assert tied["equal"] == 1 and tied["p_value"] == pytest.approx(0.3125)
    # six districts all higher: W- = 0, only 1 of 64 patterns as extreme on each side: p = 2/64
    assert wilcoxon_paired([1, 2, 3, 4, 5, 6], [0] * 6)["p_value"] == pytest.approx(0.03125)
    nothing = wilcoxon_paired([0.5, 0.6], [0.5, 0.6])
    assert nothing["p_value"] is None and nothing["equal"] == 2
    assert wilcoxon_paired([0.5, None], [0.4, 0.3])["pairs"] == 1


def test_pearson_and_strength():
    # x 1,2,3 and y 2,1,4: sxy = 2, sxx = 2, syy = 14/3, r = 2 / sqrt(28/3)
    assert pearson([1, 2, 3], [2, 1, 4]) == pytest.approx(2 / math.sqrt(28 / 3))
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([1, 2, 3, 4], [4, 3, math.inf, 1]) == pytest.approx(-1.0)
    words = {0.05: "negligible", -0.0999: "negligible", 0.1: "weak positive", -0.29: "weak negative",
             0.3: "moderate positive", -0.49: "moderate negative", 0.5: "strong positive", -0.68: "strong negative"}
    assert {r: strength(r) for r in words} == words
    assert strength(None) == "not defined"


def test_resampled_correlations_by_hand():
    x, y = [1, 2, 3], [2, 1, 4]
    indices = np.array([[0, 1, 2],    # the data: r = 2 / sqrt(28/3)
                        [0, 0, 1],    # x 1,1,2 y 2,2,1: r = -1
                        [0, 0, 0],    # one point repeated: no spread, left out
                        [2, 1, 1]])   # x 3,2,2 y 4,1,1: r = +1
    assert resampled_correlations(x, y, indices) == pytest.approx([2 / math.sqrt(28 / 3), -1.0, 1.0])
    # 0.1 three times has a rounding-level mean error; the exact spread test still leaves it out
    assert resampled_correlations([0.1, 0.2, 0.3], [1, 2, 4], np.array([[0, 0, 0]])).size == 0


def test_percentile_interval_by_hand():
    assert percentile_interval(range(101)) == pytest.approx((2.5, 97.5))
    assert percentile_interval([1.0, 2.0], confidence=0.5) == pytest.approx((1.25, 1.75))
    assert percentile_interval([]) is None


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    x = [3.0, 8.0, 15.0, 21.0, 40.0, 55.0]
    y = [60.0, 20.0, 41.0, 12.0, 30.0, 15.0]
    # the exact bootstrap distribution: every one of the 6^6 equally likely resamples
    every = np.array(list(itertools.product(range(6), repeat=6)))
    exact = percentile_interval(resampled_correlations(x, y, every))
    assert exact == pytest.approx((-0.9977, 0.3360), abs=1e-4)
    interval = bootstrap_correlation(x, y)
    assert interval == pytest.approx(exact, abs=0.05)
    assert interval[0] < pearson(x, y) < interval[1]
    assert bootstrap_correlation(x, y, seed=1) == bootstrap_correlation(x, y, seed=1)   # seeded
    assert bootstrap_correlation([1, 2], [3, 4]) is None
    assert bootstrap_correlation([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx((1.0, 1.0))


def test_least_squares_line():
    xs, ys = [8, 9, 17, 54, 33], [240.0, 160.0, 158.0, 97.0, 118.0]
    slope, intercept = np.polyfit(xs, ys, 1)
    assert least_squares_line(xs + [1], ys + [math.inf]) == pytest.approx((intercept, slope))
    assert least_squares_line([2, 2], [1, 3]) is None


def test_spearman_against_scipy_with_ties_and_gaps():
    from scipy.stats import spearmanr

    xs = [44, 44, 51, 57, 62, 74, None, 49]
    ys = [48159.0, 369.8, -3.9, 13.7, -9.9, -26.8, 5.0, float("nan")]
    kept = [(x, y) for x, y in zip(xs, ys) if x is not None and y == y]
    expected = spearmanr([x for x, _ in kept], [y for _, y in kept]).statistic
    assert spearman(xs, ys) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2], [3, 4]) is None
