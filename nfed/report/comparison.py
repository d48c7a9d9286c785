"""The study's comparison (SEED.md Table 4, made fair): local, federated, personalised and centralised F1 per
district beside the study's numbers, headline numbers and the goals of the fair re-run, over one or several
seeds. fairness.py checks how far each side was trained and what the test data carries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from nfed.common.errors import DataError
from nfed.data.districts import district_order_key, load_districts
from nfed.report.fairness import fairness
from nfed.report.run import COLUMNS, Run
from nfed.report.stats import (bootstrap_correlation, finite_mean, mean_interval, pearson, spearman, strength,
                               wilcoxon_paired)

# The goals of the fair re-run (one seed), counts out of the study's 25 districts, scaled to those compared.
GOAL_IMPROVED_OF_25 = 20
GOAL_GAIN_ON_MEANS_PCT = 20.0
GOAL_CORR_SAMPLES_GAIN = -0.3
GOAL_CENTRAL_GAP = 0.05
GOAL_PERSONALISED_OF_25 = 23
PERSONALISED_MARGIN = 0.01
# Gains over local: (column, key suffix). Keys: gain{suffix}_pct per row; gain_on_means{suffix}_pct,
# mean_gain{suffix}_pct and improved{suffix} in the headline.
GAINS = (("federated", ""), ("personalised", "_personalised"))
# Wilcoxon signed-rank tests over districts: (after, before).
PAIRED_TESTS = (("federated", "local"), ("personalised", "local"), ("personalised", "federated"))


def gain_pct(f1_local: float | None, f1_after: float | None) -> float | None:
    """Relative gain in %, as the study computes it; inf when the local F1 is 0 and the other is not."""
    if f1_local is None or f1_after is None:
        return None
    if f1_local == 0:
        return 0.0 if f1_after == 0 else math.inf
    return (f1_after - f1_local) / f1_local * 100.0


@dataclass
class Comparison:
    """The table (one row per district, study order), its summary, the columns present and the runs behind it.
    With several seeds the rows hold seed means and intervals, and `seeds` each seed's own comparison."""

    rows: list[dict]
    summary: dict
    columns: tuple[str, ...]
    runs: list[Run]
    seeds: list["Comparison"] = field(default_factory=list)


def _row(name: str, samples: int, f1: dict[str, float | None]) -> dict:
    row = {"district": name, "samples": samples, **{f"f1_{c}": v for c, v in f1.items()}}
    row.update({f"gain{suffix}_pct": gain_pct(f1["local"], f1[c]) for c, suffix in GAINS if c in f1})
    study = {d.name: d for d in load_districts()}.get(name)
    if study is not None:
        row.update({"study_samples": study.samples, "study_f1_local": study.f1_local,
                    "study_f1_federated": study.f1_federated, "study_gain_pct": study.gain_pct})
    return row


def headline(rows: list[dict], columns: Sequence[str], prefix: str = "") -> dict:
    """Mean F1 per column, gains (on the means, mean of per-district ones, districts improved), correlations
    of the federated gain with sample count and local F1 (strength, bootstrap interval), paired tests.
    `prefix` "study_" summarises the study's own columns."""
    def f1(row, c):
        return row.get(f"{prefix}f1_{c}")

    out: dict = {"districts": len(rows)}
    means = {c: finite_mean(f1(r, c) for r in rows) for c in columns}
    out.update({f"mean_f1_{c}": means[c] for c in columns})
    for c, suffix in GAINS:
        if c in columns:
            out[f"gain_on_means{suffix}_pct"] = gain_pct(means["local"], means[c])
            out[f"mean_gain{suffix}_pct"] = finite_mean(r.get(f"{prefix}gain{suffix}_pct") for r in rows)
            out[f"improved{suffix}"] = sum(1 for r in rows if None not in (f1(r, c), f1(r, "local"))
                                           and f1(r, c) >= f1(r, "local"))
    gains = [r.get(f"{prefix}gain_pct") for r in rows]
    for name, xs in (("samples", [r.get(f"{prefix}samples") for r in rows]),
                     ("f1_local", [f1(r, "local") for r in rows])):
        r = pearson(xs, gains)
        out.update({f"corr_{name}_gain": r, f"corr_{name}_gain_strength": strength(r),
                    f"corr_{name}_gain_interval": bootstrap_correlation(xs, gains),
                    f"rank_corr_{name}_gain": spearman(xs, gains)})
    out["wilcoxon"] = {f"{after}_vs_{before}": wilcoxon_paired([f1(r, after) for r in rows],
                                                               [f1(r, before) for r in rows])
                       for after, before in PAIRED_TESTS if after in columns and before in columns}
    return out


def _goal(name: str, target: str, value, measured: str, met) -> dict:
    return {"name": name, "target": target, "value": value, "measured": measured if value is not None
            else "not measured", "met": None if value is None else bool(met)}


def goals(summary: dict) -> list[dict]:
    """The five goals of the fair re-run, each with its measured value and whether it is met (None: the
    column it needs is absent). District counts are scaled from 25 to the districts compared."""
    n = summary["districts"]
    improved_needed = math.ceil(GOAL_IMPROVED_OF_25 / 25 * n)
    personalised_needed = math.ceil(GOAL_PERSONALISED_OF_25 / 25 * n)
    improved, gain = summary["improved"], summary["gain_on_means_pct"]
    corr, gap = summary["corr_samples_gain"], summary.get("federated_minus_centralised")
    at_best = summary.get("personalised_at_best")
    return [
        _goal("improved", f"federated F1 >= local F1 in >= {GOAL_IMPROVED_OF_25}/25 districts "
              f"({improved_needed}/{n} here)", improved, f"{improved}/{n}", improved >= improved_needed),
        _goal("gain_on_means", f"gain of the means >= {GOAL_GAIN_ON_MEANS_PCT:g} %", gain,
              f"{gain:+.1f} %" if gain is not None else "", gain is not None and gain >= GOAL_GAIN_ON_MEANS_PCT),
        _goal("corr_samples_gain", f"corr(samples, gain) <= {GOAL_CORR_SAMPLES_GAIN:g} (study -0.68)", corr,
              f"{corr:+.2f}" if corr is not None else "", corr is not None and corr <= GOAL_CORR_SAMPLES_GAIN),
        _goal("federated_near_centralised", f"federated mean F1 within {GOAL_CENTRAL_GAP:g} of centralised", gap,
              f"federated - centralised = {gap:+.4f}" if gap is not None else "",
              gap is not None and abs(gap) <= GOAL_CENTRAL_GAP),
        _goal("personalised_at_best", f"personalised F1 >= max(local, federated) - {PERSONALISED_MARGIN:g} in >= "
              f"{GOAL_PERSONALISED_OF_25}/25 districts ({personalised_needed}/{n} here)", at_best,
              f"{at_best}/{n}", at_best is not None and at_best >= personalised_needed),
    ]


def _goal_measures(rows: list[dict], columns: Sequence[str]) -> dict:
    """The numbers two goals need beyond the headline: federated minus centralised mean F1, and the districts
    where personalised F1 reaches max(local, federated) - PERSONALISED_MARGIN."""
    out = {}
    if "centralised" in columns:
        fed, central = finite_mean(r["f1_federated"] for r in rows), finite_mean(r["f1_centralised"] for r in rows)
        out["federated_minus_centralised"] = None if None in (fed, central) else fed - central
    if "personalised" in columns:
        out["personalised_at_best"] = sum(
            1 for r in rows if None not in (r["f1_personalised"], r["f1_local"], r["f1_federated"])
            and r["f1_personalised"] >= max(r["f1_local"], r["f1_federated"]) - PERSONALISED_MARGIN)
    return out


def summarise(rows: list[dict], columns: Sequence[str]) -> dict:
    """Headline numbers of nfed's rows and of the study's numbers for the same districts, and the goals."""
    summary = {**headline(rows, columns), **_goal_measures(rows, columns)}
    in_study = [r for r in rows if "study_f1_local" in r]
    if in_study:
        summary["study"] = headline(in_study, ("local", "federated"), prefix="study_")
    summary["goals"] = goals(summary)
    return summary


def compare_run(run: Run) -> Comparison:
    """Join one seed's columns by district (study order): the districts with local and federated results."""
    local, federated = run.results["local"], run.results["federated"]
    common = sorted(set(local) & set(federated), key=district_order_key)
    if not common:
        raise DataError(f"{run.sources['local']} and {run.sources['federated']}: the local and federated results "
                        f"have no district in common")
    columns = tuple(c for c in COLUMNS if c in run.results)
    rows = [_row(name, local[name]["samples"], {c: run.results[c].get(name, {}).get("f1") for c in columns})
            for name in common]
    summary = summarise(rows, columns)
    summary["missing_federated"] = sorted(set(local) - set(federated), key=district_order_key)
    summary["missing_local"] = sorted(set(federated) - set(local), key=district_order_key)
    section = fairness(run, common)
    summary["fairness"] = [section]
    if run.federation.get("privacy"):   # a DP-FedAvg federation: the privacy it spent
        summary["privacy"] = run.federation["privacy"]
    if run.federation.get("traffic"):   # the bytes on the wire and a paper-size round's time at 20 Mbit/s
        summary["traffic"] = run.federation["traffic"]
    if run.federation.get("environment"):   # where the federation's server computed (device, precision)
        summary["environment"] = run.federation["environment"]
    summary["warnings"] = list(section["warnings"])
    return Comparison(rows, summary, columns, [run])


def _seed_row(name: str, seed_rows: list[dict], columns: Sequence[str]) -> dict:
    """A district's row over seeds: mean F1 per column with its t-interval, gains of the means with the
    t-interval of the per-seed gains."""
    f1 = {c: mean_interval([r[f"f1_{c}"] for r in seed_rows]) for c in columns}
    row = _row(name, seed_rows[0]["samples"], {c: f1[c]["mean"] for c in columns})
    for c in columns:
        row.update({f"f1_{c}_low": f1[c]["low"], f"f1_{c}_high": f1[c]["high"]})
    for c, suffix in GAINS:
        if c in columns:
            gain = mean_interval([r[f"gain{suffix}_pct"] for r in seed_rows])
            row.update({f"gain{suffix}_pct_low": gain["low"], f"gain{suffix}_pct_high": gain["high"]})
    return row


def _numeric_keys(summary: dict) -> list[str]:
    return [k for k, v in summary.items() if k != "districts" and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def aggregate_seeds(comparisons: list[Comparison]) -> Comparison:
    """Seeds -> one table of seed means with 95 % t-intervals (districts and columns every seed has), its
    headline and goals, each headline number's mean and interval over seeds, and every seed's own numbers."""
    by_seed = [{r["district"]: r for r in c.rows} for c in comparisons]
    names = [r["district"] for r in comparisons[0].rows if all(r["district"] in seed for seed in by_seed)]
    if not names:
        raise DataError("the runs have no district in common")
    columns = tuple(c for c in COLUMNS if all(c in comparison.columns for comparison in comparisons))
    rows = [_seed_row(name, [seed[name] for seed in by_seed], columns) for name in names]
    summary = summarise(rows, columns)
    summary["seeds"] = len(comparisons)
    summary["over_seeds"] = {k: mean_interval([c.summary.get(k) for c in comparisons])
                             for k in _numeric_keys(summary)}
    summary["per_seed"] = [{"run": c.runs[0].label, **{k: v for k, v in c.summary.items()
                                                       if k not in ("fairness", "warnings", "study")}}
                           for c in comparisons]
    summary["fairness"] = [c.summary["fairness"][0] for c in comparisons]
    summary["warnings"] = [f"{c.runs[0].label}: {w}" for c in comparisons for w in c.summary["warnings"]]
    return Comparison(rows, summary, columns, [c.runs[0] for c in comparisons], seeds=comparisons)


def study_comparison(runs: Sequence[Run]) -> Comparison:
    """One run: its comparison; several (seeds): their aggregation."""
    comparisons = [compare_run(run) for run in runs]
    return comparisons[0] if len(comparisons) == 1 else aggregate_seeds(comparisons)
