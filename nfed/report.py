"""The study's comparison: local vs federated F1 per district, with the study's own numbers beside them.

Inputs: RUN_LOCAL/local.csv (nfed train-local --all) and RUN_FED/federated.csv + rounds.jsonl (nfed federate).
Outputs in REPORT/: table.csv (district, samples, f1_local, f1_federated, gain_pct), table.md, summary.json,
and PNG figures like the study's: fig3_f1_samples.png (F1 and sample count per district), fig4_before_after.png
(local vs federated F1) and fig5_f1_per_round.png (global model's validation F1 per round per district).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json_atomic, write_text_atomic
from .csvtable import read_csv_rows
from .districts import district_order_key, load_districts
from .errors import DataError

RESULT_COLUMNS = ("district", "samples", "precision", "recall", "f1", "iou")
TABLE_COLUMNS = ("district", "samples", "f1_local", "f1_federated", "gain_pct")

# What nfed demo must show (issue 5, item 6), as the real study did.
MIN_IMPROVED = 23
MIN_MEAN_GAIN_PCT = 20.0


def read_results(path: str | Path) -> dict[str, dict]:
    """district -> {samples, precision, recall, f1, iou} from a local.csv / federated.csv."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: results file not found")
    records = read_csv_rows(path, RESULT_COLUMNS, lambda row: (row["district"], {
        "samples": int(row["samples"]), **{k: float(row[k]) for k in RESULT_COLUMNS[2:]}}))
    return dict(records)


def gain_pct(f1_local: float, f1_federated: float) -> float:
    """Relative gain in %, as the study computes it; inf when the local F1 is 0 and the federated is not."""
    if f1_local == 0:
        return 0.0 if f1_federated == 0 else math.inf
    return (f1_federated - f1_local) / f1_local * 100.0


def pearson(xs, ys) -> float | None:
    """Pearson correlation of the finite pairs (None with fewer than 3 or no spread)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
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


@dataclass
class Comparison:
    rows: list[dict]
    summary: dict


def _summarise(rows: list[dict], local_key: str, fed_key: str, gain_key: str, samples_key: str) -> dict:
    n = len(rows)
    mean_local = sum(r[local_key] for r in rows) / n
    mean_fed = sum(r[fed_key] for r in rows) / n
    gains = [r[gain_key] for r in rows]
    finite = [g for g in gains if math.isfinite(g)]
    return {
        "districts": n,
        "mean_f1_local": mean_local,
        "mean_f1_federated": mean_fed,
        "gain_on_means_pct": gain_pct(mean_local, mean_fed),
        "mean_gain_pct": sum(finite) / len(finite) if finite else None,
        "improved": sum(1 for r in rows if r[fed_key] >= r[local_key]),
        "corr_samples_gain": pearson([float(r[samples_key]) for r in rows], gains),
        "corr_f1_local_gain": pearson([r[local_key] for r in rows], gains),
    }


def compare(local: dict[str, dict], federated: dict[str, dict]) -> Comparison:
    """Join local and federated results by district (study order) and summarise like SEED.md's Table 4."""
    common = sorted(set(local) & set(federated), key=district_order_key)
    if not common:
        raise DataError("the local and federated results have no district in common")
    study = {d.name: d for d in load_districts()}
    rows = []
    for name in common:
        f1_local, f1_fed = local[name]["f1"], federated[name]["f1"]
        row = {"district": name, "samples": local[name]["samples"], "f1_local": f1_local,
               "f1_federated": f1_fed, "gain_pct": gain_pct(f1_local, f1_fed)}
        if name in study:
            d = study[name]
            row.update({"study_samples": d.samples, "study_f1_local": d.f1_local,
                        "study_f1_federated": d.f1_federated, "study_gain_pct": d.gain_pct})
        rows.append(row)
    summary = _summarise(rows, "f1_local", "f1_federated", "gain_pct", "samples")
    in_study = [r for r in rows if "study_f1_local" in r]
    if in_study:
        summary["study"] = _summarise(in_study, "study_f1_local", "study_f1_federated", "study_gain_pct",
                                      "study_samples")
    summary["missing_federated"] = sorted(set(local) - set(federated), key=district_order_key)
    summary["missing_local"] = sorted(set(federated) - set(local), key=district_order_key)
    summary["criteria"] = study_criteria(summary)
    return Comparison(rows, summary)


def study_criteria(summary: dict) -> dict:
    """The shape of the study's result: >= 23 of 25 districts improved (scaled to the number compared),
    mean gain >= 20 % (both on the means and as the mean of per-district gains), gain falling with samples."""
    n = summary["districts"]
    needed = math.ceil(MIN_IMPROVED / 25 * n)
    corr = summary["corr_samples_gain"]
    mean_gain = summary["mean_gain_pct"]
    return {
        "improved_needed": needed,
        "improved_ok": summary["improved"] >= needed,
        "mean_gain_ok": summary["gain_on_means_pct"] >= MIN_MEAN_GAIN_PCT
        and (mean_gain is None or mean_gain >= MIN_MEAN_GAIN_PCT),
        "negative_correlation_ok": corr is not None and corr < 0,
    }


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for r in rows:
        writer.writerow([r["district"], r["samples"], f"{r['f1_local']:.4f}", f"{r['f1_federated']:.4f}",
                         _fmt(r["gain_pct"], 2)])
    return buffer.getvalue()


def summary_lines(summary: dict) -> list[str]:
    """The headline numbers, nfed's beside the study's."""
    study = summary.get("study", {})
    criteria = summary["criteria"]

    def pair(key, digits=4, pct=False):
        unit = " %" if pct else ""
        return f"{_fmt(summary.get(key), digits)}{unit} (study {_fmt(study.get(key), digits)}{unit})"

    return [
        f"mean F1 local -> federated: {pair('mean_f1_local')} -> {pair('mean_f1_federated')}",
        f"gain on the means: {pair('gain_on_means_pct', 1, True)}; mean of per-district gains: "
        f"{pair('mean_gain_pct', 1, True)}",
        f"districts with federated F1 >= local F1: {summary['improved']}/{summary['districts']} "
        f"(study {study.get('improved', '-')}/{study.get('districts', '-')}; needed {criteria['improved_needed']})",
        f"correlation of sample count with gain: {pair('corr_samples_gain', 2)}; "
        f"of local F1 with gain: {pair('corr_f1_local_gain', 2)}",
        "study's shape reproduced: " + ", ".join(f"{k.removesuffix('_ok')} {'yes' if v else 'NO'}"
                                                 for k, v in criteria.items() if k.endswith("_ok")),
    ]


def table_markdown(comparison: Comparison) -> str:
    header = ("| district | samples | F1 local | F1 federated | gain % | study samples | study F1 local | "
              "study F1 federated | study gain % |")
    lines = ["# nfed: local vs federated F1 per district", "", header, "|" + "---|" + "---:|" * 8]
    for r in comparison.rows:
        lines.append(f"| {r['district']} | {r['samples']} | {r['f1_local']:.4f} | {r['f1_federated']:.4f} | "
                     f"{_fmt(r['gain_pct'], 2)} | {r.get('study_samples', '-')} | "
                     f"{_fmt(r.get('study_f1_local'))} | {_fmt(r.get('study_f1_federated'))} | "
                     f"{_fmt(r.get('study_gain_pct'), 2)} |")
    lines += [""] + [f"- {line}" for line in summary_lines(comparison.summary)] + [""]
    return "\n".join(lines)


def table_text(comparison: Comparison) -> str:
    """The table as aligned plain text for the terminal."""
    out = [f"{'district':<16} {'samples':>7} {'F1 local':>9} {'F1 fed':>9} {'gain %':>8} {'study gain %':>12}"]
    for r in comparison.rows:
        out.append(f"{r['district']:<16} {r['samples']:>7} {r['f1_local']:>9.4f} {r['f1_federated']:>9.4f} "
                   f"{_fmt(r['gain_pct'], 2):>8} {_fmt(r.get('study_gain_pct'), 2):>12}")
    return "\n".join(out + [""] + summary_lines(comparison.summary))


def per_round_f1(rounds: list[dict]) -> tuple[list[int], dict[str, list[float | None]]]:
    """Round numbers and, per district, the global model's validation F1 after each round."""
    numbers = [r["round"] for r in rounds if r.get("global_val")]
    districts = []
    for r in rounds:
        for name in r.get("global_val") or {}:
            if name not in districts:
                districts.append(name)
    districts.sort(key=district_order_key)
    series = {name: [(r["global_val"].get(name) or {}).get("f1") for r in rounds if r.get("global_val")]
              for name in districts}
    return numbers, series


def draw_figures(comparison: Comparison, rounds: list[dict], out_dir: Path) -> list[Path]:
    from .figures import bar_chart, line_chart

    names = [r["district"] for r in comparison.rows]
    paths = [
        bar_chart(out_dir / "fig3_f1_samples.png", names, {"samples": [float(r["samples"]) for r in comparison.rows]},
                  title="Samples and local F1 per district (study Fig. 3)", y_label="samples",
                  points={"F1 local": [r["f1_local"] for r in comparison.rows]}, points_label="F1",
                  points_max=1.0),
        bar_chart(out_dir / "fig4_before_after.png", names,
                  {"local": [r["f1_local"] for r in comparison.rows],
                   "federated": [r["f1_federated"] for r in comparison.rows]},
                  title="F1 before (local) and after (federated) per district (study Fig. 4)", y_label="F1",
                  y_max=1.0),
    ]
    numbers, series = per_round_f1(rounds)
    if numbers:
        paths.append(line_chart(out_dir / "fig5_f1_per_round.png", numbers, series,
                                title="Global model's validation F1 per round and district (study Fig. 5)",
                                x_label="round", y_label="F1", y_max=1.0))
    return paths


def _results_file(path: Path, name: str) -> Path:
    return path if path.suffix.lower() == ".csv" and not path.is_dir() else path / name


def make_report(local: str | Path, federated: str | Path, out_dir: str | Path, *, figures: bool = True) -> Comparison:
    """Write REPORT/table.csv, table.md, summary.json and the figures; returns the comparison."""
    from .federation import ROUNDS_NAME, read_rounds

    local, federated, out_dir = Path(local), Path(federated), Path(out_dir)
    comparison = compare(read_results(_results_file(local, "local.csv")),
                         read_results(_results_file(federated, "federated.csv")))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "table.csv", table_csv(comparison.rows))
    write_text_atomic(out_dir / "table.md", table_markdown(comparison))
    rounds = read_rounds(federated / ROUNDS_NAME) if federated.is_dir() else []
    write_json_atomic(out_dir / "summary.json", {**comparison.summary, "rows": comparison.rows})
    if figures:
        comparison.summary["figures"] = [str(p) for p in draw_figures(comparison, rounds, out_dir)]
    return comparison
