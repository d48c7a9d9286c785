"""The study's report as text: table.csv, table.md and the printed summary (one layout, three renderings).

With several seeds every F1 and gain cell is "seed mean ± half-width of its 95 % t-interval", and every
headline number computed on the seed means is followed by its mean ± interval over the seeds.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from nfed.common.csvtable import csv_cell, csv_text
from nfed.report.comparison import GAINS, Comparison
from nfed.report.fairness import MIN_TEST_CHANGE_PIXELS, MIN_TEST_TILES

STUDY_COLUMNS = (("study_samples", "study samples", None), ("study_f1_local", "study F1 local", 4),
                 ("study_f1_federated", "study F1 federated", 4), ("study_gain_pct", "study gain %", 2))
NOT_RECORDED = "not recorded"
# What markdown or HTML acts on in running text and table cells, and the characters that break a line.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")
LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def markdown_text(text) -> str:
    """Text read from a file (a district or run name, a stop reason) as markdown that shows it literally: on one
    line, with every character that markdown or HTML would act on backslash-escaped, so that a hostile name cannot
    add a table cell or row, a link, a tag or emphasis."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", LINE_BREAKS.sub(" ", str(text)))


def _fmt(value, digits: int | None = 4, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:{'+' if signed else ''}.{digits}f}" if digits is not None else f"{value:g}"
    return str(value)


def _half_width(row: dict, key: str) -> float | None:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return None if low is None or high is None else (high - low) / 2


def cell_text(row: dict, key: str, digits: int | None) -> str:
    """A value, with "± half-width" when the row carries its interval over seeds."""
    half = _half_width(row, key)
    text = _fmt(row.get(key), digits)
    return text if half is None else f"{text} ± {half:.{digits}f}"


def table_columns(comparison: Comparison) -> list[tuple[str, str, int | None]]:
    """(key, header, digits) of the table: district, samples, F1 per column, gains, the study's numbers."""
    columns = [("district", "district", None), ("samples", "samples", None)]
    columns += [(f"f1_{c}", f"F1 {c}", 4) for c in comparison.columns]
    columns += [(f"gain{suffix}_pct", f"gain % {c}", 2) for c, suffix in GAINS if c in comparison.columns]
    return columns + list(STUDY_COLUMNS)


def table_csv(comparison: Comparison) -> str:
    """table.csv: one row per district; with seeds each F1/gain column is followed by its _low and _high."""
    seeds = bool(comparison.seeds)
    keys = []
    for key, _, digits in table_columns(comparison):
        keys += [(key, digits)] + ([(f"{key}_low", digits), (f"{key}_high", digits)]
                                   if seeds and key.startswith(("f1_", "gain")) else [])
    return csv_text([key for key, _ in keys], ([_csv_cell(row.get(key), digits) for key, digits in keys]
                                               for row in comparison.rows))


def _csv_cell(value, digits: int | None) -> str:
    """A table.csv cell: numbers as the table shows them, a district name guarded against formula injection."""
    return "" if value is None else csv_cell(value, lambda number: _fmt(number, digits))


def _number(summary: dict, key: str, digits: int, unit: str = "", signed: bool = False) -> str:
    """A headline number, and with seeds its mean ± half-width over the seeds."""
    text = _fmt(summary.get(key), digits, signed) + unit
    spread = summary.get("over_seeds", {}).get(key)
    if spread and spread["low"] is not None:
        text += (f" (over seeds {_fmt(spread['mean'], digits, signed)} ± "
                 f"{(spread['high'] - spread['low']) / 2:.{digits}f}{unit})")
    return text


def _count(summary: dict, key: str) -> str:
    """'k/n districts', and with seeds the mean ± half-width of k over the seeds."""
    text = f"{summary.get(key)}/{summary['districts']}"
    spread = summary.get("over_seeds", {}).get(key)
    if spread and spread["low"] is not None:
        text += f" (over seeds {spread['mean']:.1f} ± {(spread['high'] - spread['low']) / 2:.1f})"
    return text


def _correlation(summary: dict, name: str, label: str) -> str:
    interval = summary.get(f"corr_{name}_gain_interval")
    bounds = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "not defined"
    study = summary.get("study", {}).get(f"corr_{name}_gain")
    return (f"corr({label}, federated gain) = {_number(summary, f'corr_{name}_gain', 2, signed=True)}, "
            f"{summary.get(f'corr_{name}_gain_strength')}, 95 % bootstrap interval {bounds} "
            f"(study {_fmt(study, 2, True)}); rank correlation (Spearman) "
            f"{_number(summary, f'rank_corr_{name}_gain', 2, signed=True)}")


def _p_value(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def _wilcoxon(name: str, test: dict) -> str:
    after, before = name.split("_vs_")
    p = "not defined (no district differs)" if test["p_value"] is None else _p_value(test["p_value"])
    return (f"Wilcoxon signed-rank over districts, {after} vs {before}: {test['higher']} higher, {test['lower']} "
            f"lower, {test['equal']} equal, median difference {_fmt(test['median_difference'], 4, True)}, "
            f"W = {_fmt(test['statistic'], None)}, p = {p}")


def headline_lines(comparison: Comparison, text: Callable[[str], str] = str) -> list[str]:
    """Headline numbers beside the study's and paired tests; with seeds on the seed means. `text` renders the
    names read from files (the runs' labels)."""
    s, study = comparison.summary, comparison.summary.get("study", {})
    lines = []
    if comparison.seeds:
        labels = ", ".join(text(c.runs[0].label) for c in comparison.seeds)
        lines.append(f"{s['seeds']} seeds ({labels}): numbers on the seed means; ± is the half-width of the 95 % "
                     f"Student-t interval over seeds")
    others = [c for c in comparison.columns if c not in ("local", "federated")]
    lines.append(f"mean F1 local -> federated: {_number(s, 'mean_f1_local', 4)} -> {_number(s, 'mean_f1_federated', 4)}"
                 f" (study {_fmt(study.get('mean_f1_local'))} -> {_fmt(study.get('mean_f1_federated'))})"
                 + "".join(f"; {c} {_number(s, f'mean_f1_{c}', 4)}" for c in others))
    for column, suffix in GAINS:
        if column in comparison.columns:
            lines.append(
                f"{column} vs local: gain on the means {_number(s, f'gain_on_means{suffix}_pct', 1, ' %', True)}; "
                f"mean of per-district gains {_number(s, f'mean_gain{suffix}_pct', 1, ' %', True)}; districts "
                f"with {column} F1 >= local F1: {_count(s, f'improved{suffix}')}"
                + (f" (study: {_fmt(study.get('gain_on_means_pct'), 1, True)} %, "
                   f"{_fmt(study.get('mean_gain_pct'), 1, True)} %, {study.get('improved', '-')}/"
                   f"{study.get('districts', '-')})" if column == "federated" else ""))
    lines.append(_correlation(s, "samples", "samples"))
    lines.append(_correlation(s, "f1_local", "local F1"))
    for name, test in s["wilcoxon"].items():
        per_seed = [_p_value(c.summary["wilcoxon"].get(name, {}).get("p_value")) for c in comparison.seeds]
        lines.append(_wilcoxon(name, test) + (f"; per seed p = {', '.join(per_seed)}" if per_seed else ""))
    privacy = s.get("privacy")
    if privacy:
        spent = privacy.get("epsilon")
        lines.append(f"federation under DP-FedAvg (clip {privacy.get('clip')}, noise multiplier "
                     f"{privacy.get('noise_multiplier')}): privacy spent "
                     + (f"epsilon {spent:.3g} at delta {privacy.get('delta', 0):.2g}" if spent is not None
                        else "unbounded (no noise)") + f" after {privacy.get('releases')} round(s)")
    if s.get("traffic"):
        lines.append(text(traffic_line(s["traffic"])))
    return lines


def traffic_line(traffic: dict) -> str:
    """The federation's bytes on the wire and what a round of the study's model (w 64) would take at 20 Mbit/s at
    the measured ratios (summary.json's traffic)."""
    up, down = (float(traffic.get(key) or 0) / 1e6 for key in ("bytes_up", "bytes_down"))
    line = (f"bytes on the wire (--compress {traffic.get('compress')}, --broadcast {traffic.get('broadcast')}): up "
            f"{_fmt(up, 1)} MB, down {_fmt(down, 1)} MB")
    if traffic.get("paper_round_seconds_20mbit") is not None:
        line += (f"; {_fmt(traffic.get('upload_ratio'), 3)} / {_fmt(traffic.get('download_ratio'), 3)} of float32 up / "
                 f"down: a paper-size round (w 64, 67.3 M values) at 20 Mbit/s takes "
                 f"{_fmt(traffic['paper_round_seconds_20mbit'], 0)} s per district")
    return line


def goal_verdict(goal: dict) -> str:
    return "not measured" if goal["met"] is None else ("yes" if goal["met"] else "NO")


def summary_lines(comparison: Comparison, text: Callable[[str], str] = str) -> list[str]:
    """The headline lines, then one line per goal of the fair re-run."""
    return headline_lines(comparison, text) + [f"goal: {goal['target']}: {goal['measured']}: {goal_verdict(goal)}"
                                               for goal in comparison.summary["goals"]]


def _training(row: dict, column: str) -> str:
    """'epochs/steps/stop' of one column in a fairness row ("not recorded" when the file lacks them)."""
    keys = [k for k in ("epochs_run", "steps", "stop") if f"{column}_{k}" in row]
    if not keys:
        return "-"
    values = [row[f"{column}_{k}"] for k in keys]
    if all(v is None for v in values):
        return NOT_RECORDED
    text = " / ".join(_fmt(v, None) for v in values)
    best = row.get(f"{column}_best_epoch")
    return text + (" (global kept)" if column == "personalised" and best == 0 else "")


def fairness_header(section: dict, text: Callable[[str], str] = str) -> list[str]:
    """The fairness section's lines above its table; `text` renders what was read from files (names, stop
    rules and reasons)."""
    federation, central = section["federation"], section["centralised"]
    lines = [f"federation: {_fmt(federation['rounds'])} rounds, best round {_fmt(federation['best_round'])}, stop "
             f"rule {text(federation['stop_rule'] or NOT_RECORDED)} "
             f"({text(federation['stop_reason'] or NOT_RECORDED)})"]
    kept = section.get("kept") or {}
    if kept.get("round") is not None:
        lines.append(f"kept round {_fmt(kept['round'])}: {kept['rule'] or NOT_RECORDED}; its mean validation F1 "
                     f"{_fmt(kept['val_f1'], 3)}, the highest of any round {_fmt(kept['top_val_f1'], 3)} (round "
                     f"{_fmt(kept['top_round'])})")
    if central is not None:
        lines.append(f"centralised model: {_fmt(central['epochs_run'])} epochs, {_fmt(central['steps'])} steps, "
                     f"stop {text(central['stop'] or NOT_RECORDED)} (best epoch {_fmt(central['best_epoch'])}), "
                     f"{_fmt(central['train_samples'])} training samples")
    totals = []
    for column in ("local", "federated", "personalised"):
        steps = [row.get(f"{column}_steps") for row in section["districts"] if f"{column}_steps" in row]
        if steps and None not in steps:
            totals.append(f"{column} {sum(steps):,}")
    if central is not None and central["steps"] is not None:
        totals.append(f"centralised {central['steps']:,}")
    lines.append("optimiser steps over all districts: " + (", ".join(totals) or NOT_RECORDED))
    for column, names in section["capped"].items():
        lines.append(f"{column} runs that ended on the epoch cap: {', '.join(map(text, names)) or 'none'}")
    lines.append(f"test splits too small (< {MIN_TEST_TILES} tiles or < {MIN_TEST_CHANGE_PIXELS:,} change pixels): "
                 f"{', '.join(map(text, section['small_test_split'])) or 'none'}")
    return lines


FAIRNESS_COLUMNS = (("test tiles", "test_tiles"), ("test pixels", "test_pixels"),
                    ("test change pixels", "test_change_pixels"))


def fairness_cells(section: dict) -> tuple[list[str], list[list[str]]]:
    rows = section["districts"]
    trained = [c for c in ("local", "federated", "personalised") if rows and any(k.startswith(c) for k in rows[0])]
    header = ["district"] + [h for h, _ in FAIRNESS_COLUMNS] + [
        f"{c} epochs / steps" + ("" if c == "federated" else " / stop") for c in trained]
    cells = [[row["district"]] + [_fmt(row[k], None) if row[k] is not None else NOT_RECORDED
                                  for _, k in FAIRNESS_COLUMNS] + [_training(row, c) for c in trained] for row in rows]
    return header, cells


def fairness_markdown(section: dict, heading: str) -> list[str]:
    """The fairness section in markdown under `heading`; every cell and warning shown as text (markdown_text)."""
    header, cells = fairness_cells(section)
    lines = [heading, ""] + [f"- {line}" for line in fairness_header(section, markdown_text)] + [""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(map(markdown_text, row)) + " |" for row in cells]
    return lines + [""] + [f"- warning: {markdown_text(w)}" for w in section["warnings"]] + [""]


def table_markdown(comparison: Comparison) -> str:
    """table.md: the table, the headline and goals, the fairness section (per seed)."""
    columns = table_columns(comparison)
    lines = ["# nfed: " + ", ".join(comparison.columns) + " F1 per district (study Table 4)", "",
             "| " + " | ".join(header for _, header, _ in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(markdown_text(cell_text(row, key, digits)) for key, _, digits in columns) + " |"
              for row in comparison.rows]
    lines += [""] + [f"- {line}" for line in summary_lines(comparison, markdown_text)] + ["", "## Fairness", ""]
    for section in comparison.summary["fairness"]:
        run = markdown_text(section["run"])
        heading = f"### {run}" if comparison.seeds else f"Run {run}:"
        lines += fairness_markdown(section, heading)
    return "\n".join(lines)


def _aligned(header: list[str], cells: list[list[str]]) -> list[str]:
    widths = [max(len(text) for text in column) for column in zip(header, *cells)]
    return ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
            for line in [header] + cells]


def comparison_text(comparison: Comparison) -> str:
    """The printed summary: the table, headline and goals, and the fairness section."""
    columns = [c for c in table_columns(comparison) if c[0] not in ("study_samples", "study_f1_local",
                                                                     "study_f1_federated")]
    table = _aligned([header for _, header, _ in columns],
                     [[cell_text(row, key, digits) for key, _, digits in columns] for row in comparison.rows])
    lines = table + [""] + summary_lines(comparison) + ["", "fairness:"]
    for section in comparison.summary["fairness"]:
        if comparison.seeds:
            lines.append(f"[{section['run']}]")
        lines += [f"  {line}" for line in fairness_header(section)]
    if not comparison.seeds:
        lines += [f"  {line}" for line in _aligned(*fairness_cells(comparison.summary["fairness"][0]))]
    return "\n".join(lines)
