"""Districts that never trained (--hold-out): RUN/heldout.csv, one row per held-out district with its own local
model's test F1 (when a study trained one), the global model's, and the global model's after AdaBN on the district's
own training tiles (nfed.training.adapt: BatchNorm statistics re-estimated, no labels, no training). One owner of
the file's format: this module."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from nfed.common.atomic import write_text_atomic
from nfed.common.csvtable import read_csv_rows
from nfed.runs.results import read_f1, results_csv_text

HELDOUT_NAME = "heldout.csv"
HELDOUT_COLUMNS = ("district", "local_f1", "global_f1", "adapted_f1")
F1_COLUMNS = HELDOUT_COLUMNS[1:]


def held_out_rows(districts: Sequence[str], global_scores: Mapping[str, Mapping],
                  adapted_scores: Mapping[str, Mapping], local_f1: Mapping[str, float] | None = None) -> list[dict]:
    """heldout.csv's rows: each district's F1 of the global model before and after adaptation (and of its local
    model); a score that is missing (its evaluation failed) is blank."""
    local_f1 = local_f1 or {}
    return [{"district": district, "local_f1": _f1(local_f1.get(district)),
             "global_f1": _f1(global_scores.get(district, {}).get("f1")),
             "adapted_f1": _f1(adapted_scores.get(district, {}).get("f1"))} for district in districts]


def write_heldout(run_dir: str | Path, rows: Sequence[Mapping]) -> Path:
    """RUN/heldout.csv (atomic; names guarded against formula injection, F1 as the results tables write it)."""
    path = Path(run_dir) / HELDOUT_NAME
    write_text_atomic(path, results_csv_text(rows, HELDOUT_COLUMNS))
    return path


def read_heldout(path: str | Path) -> list[dict]:
    """The rows of a heldout.csv; DataError naming the file and line on bad content."""
    def convert(row: dict) -> dict:
        return {"district": row["district"], **{column: read_f1(row[column]) for column in F1_COLUMNS}}

    return read_csv_rows(path, HELDOUT_COLUMNS, convert)


def add_local_f1(run_dir: str | Path, local_f1: Mapping[str, float]) -> Path | None:
    """Fill heldout.csv's local column from a study's local models (the demo, after the federated column); None
    when the run held out no district."""
    path = Path(run_dir) / HELDOUT_NAME
    if not path.is_file():
        return None
    rows = [{**row, "local_f1": _f1(local_f1.get(row["district"]))} for row in read_heldout(path)]
    return write_heldout(run_dir, rows)


def _f1(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


