"""Districts that never trained (--hold-out) in the report: the global model's test F1 on each held-out district
before and after AdaBN on its own training tiles, beside its own local model (RUN/federated/heldout.csv per seed);
summary.json's numbers (the mean gain of adaptation over the unadapted global model, against the issue's +0.05
goal) and one line for table.md and the terminal."""
from __future__ import annotations

from typing import Sequence

from nfed.report.run import Run
from nfed.report.stats import finite_mean, mean_interval
from nfed.runs.results import f1_text

GOAL_GAIN = 0.05   # issue 24: AdaBN on an unseen district >= +0.05 F1 over the unadapted global model


def heldout_pairs(runs: Sequence[Run]) -> list[tuple[str, dict]]:
    """(run label, heldout.csv row) of every run that held districts out."""
    return [(run.label, row) for run in runs for row in (run.heldout or ())]


def heldout_summary(runs: Sequence[Run]) -> dict | None:
    """summary.json's "held_out": mean F1 of the local, global and adapted models over the held-out districts of
    every seed, the adaptation's gain (adapted - global: mean, 95 % interval, how many went up) and the goal."""
    pairs = heldout_pairs(runs)
    if not pairs:
        return None
    rows = [row for _, row in pairs]
    gains = [row["adapted_f1"] - row["global_f1"] for row in rows
             if row["adapted_f1"] is not None and row["global_f1"] is not None]
    gain = mean_interval(gains)
    return {"districts": sorted({row["district"] for row in rows}), "seeds": len({label for label, _ in pairs}),
            "scores": len(rows), "local_f1": finite_mean(row["local_f1"] for row in rows),
            "global_f1": finite_mean(row["global_f1"] for row in rows),
            "adapted_f1": finite_mean(row["adapted_f1"] for row in rows),
            "gain": gain["mean"], "gain_low": gain["low"], "gain_high": gain["high"],
            "improved": sum(1 for g in gains if g > 0), "pairs": len(gains), "goal_gain": GOAL_GAIN,
            "goal_met": None if gain["mean"] is None else gain["mean"] >= GOAL_GAIN}


def heldout_line(summary: dict) -> str:
    """One line: the held-out districts' F1 before and after adaptation, the gain against the goal, their local
    models."""
    seeds = f" over {summary['seeds']} seeds" if summary["seeds"] > 1 else ""
    interval = (f" [{summary['gain_low']:+.4f}, {summary['gain_high']:+.4f}]"
                if summary["gain_low"] is not None else "")
    if summary["goal_met"] is None:
        verdict = "no pair to compare"
    else:
        verdict = f"goal >= +{summary['goal_gain']:.2f} {'met' if summary['goal_met'] else 'missed'}"
    gain = "-" if summary["gain"] is None else f"{summary['gain']:+.4f}"
    return (f"Districts that never trained ({len(summary['districts'])} held out{seeds}): global model test F1 "
            f"{f1_text(summary['global_f1'])}, after AdaBN on their own training tiles "
            f"{f1_text(summary['adapted_f1'])} "
            f"(gain {gain}{interval}, {summary['improved']} of {summary['pairs']} up; {verdict}); their own local "
            f"models {f1_text(summary['local_f1'])}")
