"""Change-detection metrics from one pooled confusion matrix.

Change-detection papers pool the confusion matrix over the whole evaluated set (TP/FP/FN/TN summed over
all pixels of all tiles) and compute precision, recall, F1 and IoU of the change class from it, never a mean
of per-tile scores. A pixel is "change" when its value is > 0, so masks with change types (1..4) and
binary masks (0/1 or 0/255) count the same way.

Undefined ratios (e.g. precision when nothing was predicted as change) are reported as 0.0.
"""
from __future__ import annotations

from nfed.common import backend


class ConfusionMatrix:
    """Pooled binary confusion matrix of the change class; accepts NumPy or CuPy arrays."""

    def __init__(self) -> None:
        self.tp = 0
        self.fp = 0
        self.fn = 0
        self.tn = 0

    def update(self, pred, target) -> "ConfusionMatrix":
        """Add the pixels of `pred` vs `target` (same shape; change = value > 0)."""
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        xp = backend.array_module(pred, target)
        predicted = xp.asarray(pred) > 0
        actual = xp.asarray(target) > 0
        tp = int(xp.count_nonzero(predicted & actual))
        predicted_total = int(xp.count_nonzero(predicted))
        actual_total = int(xp.count_nonzero(actual))
        total = int(predicted.size)
        self.tp += tp
        self.fp += predicted_total - tp
        self.fn += actual_total - tp
        self.tn += total - predicted_total - actual_total + tp
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (pooling over tiles, batches or districts)."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn
        return self

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def metrics(self) -> dict:
        """precision, recall, f1, iou, oa, kappa (floats) and the four counts (ints)."""
        tp, fp, fn, tn, total = self.tp, self.fp, self.fn, self.tn, self.total
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        iou = _ratio(tp, tp + fp + fn)
        oa = _ratio(tp + tn, total)
        kappa = cohen_kappa(tp, fp, fn, tn)
        return {"precision": precision, "recall": recall, "f1": f1, "iou": iou, "oa": oa, "kappa": kappa,
                "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def cohen_kappa(tp: int, fp: int, fn: int, tn: int) -> float:
    """Agreement beyond chance between prediction and truth (1 = perfect, 0 = chance level)."""
    total = tp + fp + fn + tn
    if total == 0:
        return 0.0
    observed = (tp + tn) / total
    expected = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (total * total)
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0
