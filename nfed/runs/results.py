"""The per-district results tables of a study run: one owner of their columns, number format, writer and reader.

local.csv, personalised.csv, federated.csv and central.csv share the first columns (the test metrics and
what they rest on); the columns after them say how much training each side had, which is what makes a
comparison fair or not (SEED.md's protocol; ARCHITECTURE.md "what makes a comparison count").
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from nfed.common.atomic import write_text_atomic
from nfed.common.csvtable import csv_cell, csv_text, read_csv_rows
from nfed.common.errors import DataError

METRIC_COLUMNS = ("district", "samples", "precision", "recall", "f1", "iou")
TEST_COLUMNS = ("train_samples", "test_tiles", "test_pixels", "test_change_pixels")
TRAINING_COLUMNS = ("epochs_run", "steps", "stop", "best_epoch")

# Which columns each table has (a table written by an older nfed has only METRIC_COLUMNS).
COLUMNS = {
    "local": METRIC_COLUMNS + TEST_COLUMNS + TRAINING_COLUMNS,
    "personalised": METRIC_COLUMNS + TEST_COLUMNS + TRAINING_COLUMNS,
    "federated": METRIC_COLUMNS + TEST_COLUMNS + ("epochs_run", "steps"),
    "central": METRIC_COLUMNS + TEST_COLUMNS,
}
FILE_NAMES = {"local": "local.csv", "personalised": "personalised.csv", "federated": "federated.csv",
              "central": "central.csv"}
# The columns after METRIC_COLUMNS that hold text; the others are counts (integers).
TEXT_COLUMNS = ("stop",)
COUNT_COLUMNS = tuple(c for c in TEST_COLUMNS + TRAINING_COLUMNS if c not in TEXT_COLUMNS)


def study_table(run_dir: str | Path, kind: str) -> Path:
    """Where a study run folder (`nfed demo --out RUN`) keeps a table: RUN/<kind>/<kind>.csv."""
    return Path(run_dir) / kind / FILE_NAMES[kind]


def test_facts(scores: Mapping, tile: int) -> dict:
    """What an F1 rests on: tiles, pixels and change pixels (tp + fn) of the evaluated split."""
    tiles = int(scores.get("samples", 0))
    return {"test_tiles": tiles, "test_pixels": tiles * int(tile) * int(tile),
            "test_change_pixels": int(scores.get("tp", 0)) + int(scores.get("fn", 0))}


def federated_row(district: str, metrics: Mapping, work: Mapping) -> dict:
    """federated.csv's row of a district: the global model's test metrics (`samples`: all tiles of its pack),
    what they rest on, and the local `work` (epochs_run, steps) its client did over the rounds."""
    samples = metrics.get("pack_samples", metrics.get("samples", 0))
    return {"district": district, "samples": int(samples),
            **{k: float(metrics.get(k, float("nan"))) for k in METRIC_COLUMNS[2:]},
            "train_samples": metrics.get("train_samples"),
            **(test_facts(metrics, metrics["tile"]) if "tile" in metrics else {}), **work}


def format_value(value) -> str:
    """Floats with 6 decimals (every table the same), None as empty, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def f1_text(value) -> str:
    """An F1 for a line or a table cell: 4 decimals, '-' when there is none."""
    return "-" if value is None else f"{value:.4f}"


def read_f1(text: str | None) -> float | None:
    """An F1 cell of a results CSV: empty is None, else a number in [0, 1] (ValueError otherwise)."""
    if text is None or not text.strip():
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"F1 {text} is not in [0, 1]")
    return value


def results_csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """The table's CSV text: numbers by format_value, text guarded against formula injection (csv_cell)."""
    return csv_text(columns, ([csv_cell(row.get(column), format_value) for column in columns] for row in rows))


def write_results_csv(path: str | Path, rows: Sequence[Mapping], kind: str) -> Path:
    """Write one results table (`kind`: local, personalised, federated or central) atomically."""
    path = Path(path)
    write_text_atomic(path, results_csv_text(rows, COLUMNS[kind]))
    return path


def _result_record(row: dict) -> tuple[str, dict]:
    record = {"samples": int(row["samples"]), **{k: float(row[k]) for k in METRIC_COLUMNS[2:]}}
    record.update({k: int(row[k]) for k in COUNT_COLUMNS if (row.get(k) or "").strip()})
    record.update({k: row[k].strip() for k in TEXT_COLUMNS if (row.get(k) or "").strip()})
    return row["district"], record


def read_results(path: str | Path) -> dict[str, dict]:
    """district -> {samples, precision, recall, f1, iou, and those of the later columns the file has}: a table
    written by an older nfed has only METRIC_COLUMNS."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: results file not found")
    return dict(read_csv_rows(path, METRIC_COLUMNS, _result_record))
