"""The study's figures from a Comparison, each drawn to carry one message.

fig3_gain_vs_samples.png: federated gain against sample count (the study's claim: small districts gain most);
fig3_f1_samples.png: samples and local F1 per district (the study's Fig. 3); fig4_before_after.png: F1 per
district for every column; fig5_f1_per_round.png: the global model's validation F1 per round, one thin line
per district and their mean in bold, the best and last rounds marked. Seed intervals are drawn as whiskers.
"""
from __future__ import annotations

import math
from pathlib import Path

from nfed.data.districts import district_order_key
from nfed.report.comparison import Comparison
from nfed.report.plots import bar_chart, line_chart, scatter_chart
from nfed.report.stats import finite_mean, least_squares_line


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return None if low is None or high is None else (low, high)


def gain_vs_samples(comparison: Comparison, path: Path) -> Path:
    rows, summary = comparison.rows, comparison.summary
    points = [(float(r["samples"]), r["gain_pct"], r["district"]) for r in rows if r["gain_pct"] is not None]
    fit = least_squares_line([x for x, *_ in points], [y for _, y, _ in points])
    r, interval = summary["corr_samples_gain"], summary["corr_samples_gain_interval"]
    legend = [f"r(samples, gain) = {r:+.2f}, {summary['corr_samples_gain_strength']}" if r is not None
              else "r(samples, gain) not defined"]
    if interval:
        legend[0] += f", 95 % bootstrap interval [{interval[0]:+.2f}, {interval[1]:+.2f}] (study -0.68)"
    if fit:
        legend.append(f"red: least-squares line gain = {fit[0]:.1f} {'-' if fit[1] < 0 else '+'} {abs(fit[1]):.4g} "
                      f"x samples (curved on the log axis)")
    left_out = [name for _, y, name in points if not math.isfinite(y)]
    if left_out:
        legend.append(f"left out (local F1 0, gain infinite): {', '.join(left_out)}")
    if comparison.seeds:
        legend.append(f"whiskers: 95 % t-interval of the gain over {len(comparison.seeds)} seeds")
    return scatter_chart(path, points, title="Federated gain vs samples per district: do small districts gain most?",
                         x_label="samples (log scale)", y_label="federated gain over local F1, %", log_x=True,
                         errors=[_interval(r, "gain_pct") for r in rows if r["gain_pct"] is not None],
                         curve=(lambda x: fit[0] + fit[1] * x) if fit else None, legend=legend)


def samples_and_local_f1(comparison: Comparison, path: Path) -> Path:
    rows = comparison.rows
    return bar_chart(path, [r["district"] for r in rows], {"samples": [float(r["samples"]) for r in rows]},
                     title="Samples and local F1 per district (study Fig. 3)", y_label="samples",
                     points={"F1 local": [r["f1_local"] for r in rows]}, points_label="F1", points_max=1.0)


def before_after(comparison: Comparison, path: Path) -> Path:
    rows = comparison.rows
    whiskers = {c: [_interval(r, f"f1_{c}") for r in rows] for c in comparison.columns} if comparison.seeds else None
    title = "F1 per district: " + ", ".join(comparison.columns) + " (study Fig. 4)"
    if comparison.seeds:
        title += f", means and 95 % intervals over {len(comparison.seeds)} seeds"
    return bar_chart(path, [r["district"] for r in rows], {c: [r[f"f1_{c}"] for r in rows] for c in comparison.columns},
                     title=title, y_label="F1", y_max=1.0, whiskers=whiskers)


def per_round_f1(rounds: list[dict]) -> tuple[list[int], dict[str, list[float | None]]]:
    """Round numbers and, per district, the global model's validation F1 after each round."""
    evaluated = [r for r in rounds if r.get("global_val")]
    districts = sorted({name for r in evaluated for name in r["global_val"]}, key=district_order_key)
    return ([r["round"] for r in evaluated],
            {name: [(r["global_val"].get(name) or {}).get("f1") for r in evaluated] for name in districts})


def round_curves(comparison: Comparison):
    """Round numbers, per district the validation F1 per round (mean over seeds), their mean per round, and
    markers (round, label) for each run's best (kept) and last round."""
    per_run = [per_round_f1(run.rounds) for run in comparison.runs]
    numbers = sorted({n for run_numbers, _ in per_run for n in run_numbers})
    names = sorted({name for _, series in per_run for name in series}, key=district_order_key)
    at = [{name: dict(zip(run_numbers, values)) for name, values in series.items()} for run_numbers, series in per_run]
    series = {name: [finite_mean(run.get(name, {}).get(n) for run in at) for n in numbers] for name in names}
    mean = [finite_mean(values[i] for values in series.values()) for i in range(len(numbers))]
    runs_at: dict[tuple[int, str], list[str]] = {}
    for run, (run_numbers, _) in zip(comparison.runs, per_run):
        best = run.federation.get("best_round")
        if best is not None:
            runs_at.setdefault((best, f"best round {best}, kept"), []).append(run.label)
        if run_numbers:
            runs_at.setdefault((run_numbers[-1], f"stop after round {run_numbers[-1]}"), []).append(run.label)
    markers = [(x, text + (f" ({', '.join(labels)})" if comparison.seeds else ""))
               for (x, text), labels in runs_at.items()]
    return numbers, series, mean, markers


def f1_per_round(comparison: Comparison, path: Path) -> Path | None:
    numbers, series, mean, markers = round_curves(comparison)
    if not numbers:
        return None
    title = "Global model's validation F1 per round: each district (thin) and their mean (bold)"
    if comparison.seeds:
        title += f", means over {len(comparison.seeds)} seeds"
    return line_chart(path, numbers, series, title=title, x_label="round", y_label="validation F1", y_max=1.0,
                      bold=("mean over districts", mean), markers=markers)


def draw_figures(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Write the figures into out_dir; returns their paths (fig5 only when rounds were recorded)."""
    paths = [samples_and_local_f1(comparison, out_dir / "fig3_f1_samples.png"),
             gain_vs_samples(comparison, out_dir / "fig3_gain_vs_samples.png"),
             before_after(comparison, out_dir / "fig4_before_after.png"),
             f1_per_round(comparison, out_dir / "fig5_f1_per_round.png")]
    return [p for p in paths if p is not None]
