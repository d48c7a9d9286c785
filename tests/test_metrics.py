"""Pooled change-detection metrics against confusion matrices counted by hand."""
from __future__ import annotations

import numpy as np
import pytest

from nfed.core.metrics import ConfusionMatrix, cohen_kappa


def test_counts_and_metrics_match_hand_computed_matrix():
    target = np.array([[0, 1, 1, 0],
                       [0, 2, 0, 0]])        # 3 change pixels (type 2 counts as change)
    pred = np.array([[0, 1, 0, 1],
                     [0, 255, 0, 0]])        # predicted change at 3 pixels
    m = ConfusionMatrix().update(pred, target).metrics()
    # by hand: TP = (0,1),(1,1) = 2 ; FP = (0,3) = 1 ; FN = (0,2) = 1 ; TN = 8 - 4 = 4
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["oa"] == pytest.approx(6 / 8)
    # kappa: po = 0.75, pe = (3*3 + 5*5) / 64 = 34/64
    assert m["kappa"] == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))


def test_pooling_sums_counts_instead_of_averaging_per_tile_scores():
    # tile 1: perfect on 1 change pixel; tile 2: 1 TP, 3 FP
    t1, p1 = np.array([1, 0, 0, 0]), np.array([1, 0, 0, 0])
    t2, p2 = np.array([1, 0, 0, 0]), np.array([1, 1, 1, 1])
    pooled = ConfusionMatrix().update(p1, t1).update(p2, t2)
    m = pooled.metrics()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 3, 0, 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3))      # 0.5714, not mean(1.0, 0.4) = 0.7
    merged = ConfusionMatrix().update(p1, t1).merge(ConfusionMatrix().update(p2, t2))
    assert merged.metrics() == m


def test_undefined_ratios_are_zero_and_perfect_agreement_has_kappa_one():
    empty = ConfusionMatrix().metrics()
    assert empty["f1"] == 0.0 and empty["kappa"] == 0.0 and empty["oa"] == 0.0
    no_change = ConfusionMatrix().update(np.zeros((2, 3)), np.zeros((2, 3))).metrics()
    assert no_change["precision"] == 0.0 and no_change["oa"] == 1.0 and no_change["kappa"] == 1.0
    perfect = ConfusionMatrix().update(np.array([0, 1, 1]), np.array([0, 1, 1])).metrics()
    assert perfect["f1"] == 1.0 and perfect["iou"] == 1.0 and perfect["kappa"] == pytest.approx(1.0)


def test_kappa_is_zero_at_chance_level():
    # prediction independent of truth with matching marginals: po == pe
    assert cohen_kappa(tp=25, fp=25, fn=25, tn=25) == pytest.approx(0.0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix().update(np.zeros((2, 2)), np.zeros((2, 3)))
