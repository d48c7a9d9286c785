"""The statistics of the study's report: intervals over seeds, correlations with bootstrap intervals, paired tests.

Pure functions on plain sequences of floats; None stands for "not defined" (too few values, no spread), so
results can go straight into JSON.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Upper bounds of |r| for the words used in the report (|r| >= 0.5 is "strong").
STRENGTH_WORDS = ((0.1, "negligible"), (0.3, "weak"), (0.5, "moderate"))


def finite_mean(values) -> float | None:
    """Mean of the finite values (None, inf and nan left out); None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and the two-sided Student-t interval of the mean, mean +- t_{(1+c)/2, n-1} * s / sqrt(n).

    Non-finite values are left out; with one value the bounds are None, with none everything is None.
    """
    from scipy.stats import t

    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(finite) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def finite_pairs(xs: Sequence[float | None], ys: Sequence[float | None]) -> list[tuple[float, float]]:
    """The (x, y) pairs where both are finite numbers (None, inf and nan left out)."""
    return [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x)
            and math.isfinite(y)]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of the finite pairs (None with fewer than 3 or no spread)."""
    pairs = finite_pairs(xs, ys)
    if len(pairs) < 3:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Rank correlation of the finite pairs (ties share their mean rank): one district whose local F1 is near
    zero has a gain of thousands of percent, which dominates Pearson's r but is only the top rank here."""
    from scipy.stats import rankdata

    pairs = finite_pairs(xs, ys)
    if len(pairs) < 3:
        return None
    return pearson(list(rankdata([x for x, _ in pairs])), list(rankdata([y for _, y in pairs])))


def strength(r: float | None) -> str:
    """Words for a correlation: negligible (|r| < 0.1), weak (< 0.3), moderate (< 0.5), strong, with its sign."""
    if r is None:
        return "not defined"
    word = next((w for bound, w in STRENGTH_WORDS if abs(r) < bound), "strong")
    return word if word == "negligible" else f"{word} {'negative' if r < 0 else 'positive'}"


def resampled_correlations(xs: Sequence[float], ys: Sequence[float], indices: np.ndarray) -> np.ndarray:
    """Pearson r of (xs[i], ys[i]) for each row i of `indices` (one resample per row); rows whose x or y has
    no spread are left out."""
    x = np.asarray(xs, dtype=np.float64)[indices]
    y = np.asarray(ys, dtype=np.float64)[indices]
    dx = x - x.mean(axis=1, keepdims=True)
    dy = y - y.mean(axis=1, keepdims=True)
    defined = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)   # exact test: the mean may round
    sxx, syy = (dx * dx).sum(axis=1), (dy * dy).sum(axis=1)
    return np.clip((dx * dy).sum(axis=1)[defined] / np.sqrt(sxx[defined] * syy[defined]), -1.0, 1.0)


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The (1-c)/2 and (1+c)/2 percentiles (linear interpolation) of `values`; None when there are none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def bootstrap_correlation(xs: Sequence[float], ys: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Pearson r over the finite pairs: `resamples` draws of the pairs with
    replacement (seeded, so the report is reproducible). None with fewer than 3 pairs."""
    pairs = finite_pairs(xs, ys)
    if len(pairs) < 3:
        return None
    indices = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    x, y = zip(*pairs)
    return percentile_interval(resampled_correlations(x, y, indices), confidence)


def wilcoxon_paired(after: Sequence[float], before: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of after - before over paired values (scipy.stats.wilcoxon, zero
    differences dropped): statistic = min(W+, W-), p-value, and how many pairs went up, down or stayed."""
    from scipy.stats import wilcoxon

    pairs = [(a, b) for a, b in zip(after, before) if a is not None and b is not None]
    differences = [a - b for a, b in pairs]
    result = {"pairs": len(pairs), "higher": sum(d > 0 for d in differences),
              "lower": sum(d < 0 for d in differences), "equal": sum(d == 0 for d in differences),
              "median_difference": float(np.median(differences)) if differences else None,
              "statistic": None, "p_value": None}
    if result["higher"] + result["lower"] == 0:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def least_squares_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line y = a + b x over the finite pairs; None with fewer than 2
    pairs or no spread in x."""
    pairs = finite_pairs(xs, ys)
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    return my - slope * mx, slope
