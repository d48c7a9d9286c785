"""The cross-district matrix: every district's local model and the federation's global model scored on every
district's test split, to show how far a model carries beyond the district it learnt from.

Rows are models (a local model named by its district, and `global`), columns districts, cells the change class's
F1 pooled over the split's tiles; a missing model or pack leaves its cells blank. The global row is "the
federation's model as district d would use it": under a norm policy that keeps BatchNorm per district (fedbn,
silobn) each cell uses that district's own BatchNorm tensors of the kept round (RUN/federated/client_state/), as
the federation scores it. The summary: mean F1 on the diagonal (in-district), off it (out-of-district), their gap,
and the global row's mean. RUN/matrix.csv holds the cells (one owner of the format: this module), RUN/matrix.json
the summary.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.common.csvtable import csv_cell, csv_text, read_cell, read_csv_rows
from nfed.common.errors import DataError
from nfed.runs.results import format_value, read_f1, study_table
from nfed.runs.runfolder import BEST_NAME, client_local_state
from nfed.training.environment import RunEnvironment, default_environment

MATRIX_NAME = "matrix.csv"
MATRIX_SUMMARY_NAME = "matrix.json"
GLOBAL_ROW = "global"
MODEL_COLUMN = "model"


@dataclass
class DistrictMatrix:
    """`districts`: the columns in order; `rows`: model name -> F1 per district (None: blank)."""

    districts: list[str]
    rows: dict[str, list[float | None]]

    def summary(self) -> dict:
        """In-district (diagonal) and out-of-district (off-diagonal) mean F1 of the local models, their gap, and
        the global row's mean; blank cells are left out and counted."""
        inside, outside = [], []
        for name, row in self.rows.items():
            if name in self.districts:
                for district, value in zip(self.districts, row):
                    if value is not None:
                        (inside if district == name else outside).append(value)
        in_f1, out_f1 = _mean(inside), _mean(outside)
        return {"districts": len(self.districts),
                "local_models": sum(1 for name, row in self.rows.items()
                                    if name in self.districts and any(v is not None for v in row)),
                "in_district_f1": in_f1, "out_of_district_f1": out_f1,
                "gap": None if in_f1 is None or out_f1 is None else in_f1 - out_f1,
                "global_f1": _mean(v for v in self.rows.get(GLOBAL_ROW, []) if v is not None),
                "in_district_cells": len(inside), "out_of_district_cells": len(outside)}


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def cross_district_matrix(model_paths: Mapping[str, str | Path | None], packs: Mapping[str, str | Path],
                          split: str = "test", local_states: Mapping[str, tuple[Path, int] | None] | None = None, *,
                          districts: Sequence[str] | None = None, batch_size: int = 8,
                          env: RunEnvironment | None = None,
                          on_row: Callable[[str, list], None] = lambda name, row: None) -> DistrictMatrix:
    """Each model (row name -> checkpoint; absent or None: a blank row) on `split` of each pack (district ->
    pack; `districts` the columns, by default the packs' in their order). `local_states`: row name ->
    local_states_of(its checkpoint), for a federated model whose districts keep their own BatchNorm.
    Sequential: at the demo's size the whole matrix takes minutes on 2 cores (README), less than a worker pool's
    start-up would save."""
    from nfed.data.reader import DistrictPack
    from nfed.model.checkpoint import check_state_matches
    from nfed.training.trainer import evaluate, model_from_checkpoint

    env = env or default_environment()
    districts = list(districts if districts is not None else packs)
    if MODEL_COLUMN in districts:
        raise DataError(f"a district named '{MODEL_COLUMN}' clashes with the matrix's first column")
    rows: dict[str, list[float | None]] = {}
    with env.active(), ExitStack() as opened:
        # each pack opened (and its HDF5 checked) once for all the models, not once per model
        columns = {district: opened.enter_context(DistrictPack(packs[district]))
                   for district in districts if district in packs}
        for name, path in model_paths.items():
            row: list[float | None] = [None] * len(districts)
            if path is not None and Path(path).is_file():
                model, checkpoint = model_from_checkpoint(path, device=env.device)
                weights = checkpoint.model_state
                states = (local_states or {}).get(name)
                for j, district in enumerate(districts):
                    pack = columns.get(district)
                    if pack is None:
                        continue
                    if states is not None:   # the district's own BatchNorm of the kept round in place
                        own = client_local_state(states[0], district, states[1] + 1) or {}
                        check_state_matches(weights, {**weights, **own}, states[0])
                        model.load_state_dict({**weights, **own})
                    if pack.num_samples(split):
                        row[j] = float(evaluate(model, pack, split, batch_size)["f1"])
            rows[name] = row
            on_row(name, row)
    return DistrictMatrix(districts, rows)


def run_local_states(federated_model: str | Path) -> tuple[Path, int] | None:
    """Where the global model's districts keep their own BatchNorm (local_states_of), None when they do not."""
    from nfed.model.checkpoint import load_checkpoint
    from nfed.training.study import local_states_of

    return local_states_of(load_checkpoint(federated_model), federated_model)


def run_models(run_dir: str | Path, districts: Sequence[str]) -> dict[str, Path]:
    """The matrix's rows of a study run folder: RUN/local/<district>/best.h5 per district, RUN/federated/best.h5
    as `global` (paths whether or not the files are there)."""
    from nfed.common.names import child_path

    if GLOBAL_ROW in districts:
        raise DataError(f"a district named '{GLOBAL_ROW}' clashes with the global model's row of the matrix")
    local_dir = study_table(run_dir, "local").parent
    paths = {d: child_path(local_dir, d) / BEST_NAME for d in districts}
    return {**paths, GLOBAL_ROW: study_table(run_dir, "federated").parent / BEST_NAME}


def run_matrix(run_dir: str | Path, packs: Mapping[str, str | Path], split: str = "test", *,
               out_dir: str | Path | None = None, env: RunEnvironment | None = None,
               on_row: Callable[[str, list], None] = lambda name, row: None) -> tuple[DistrictMatrix, dict]:
    """The matrix of a study run folder (run_models: one local row per pack's district, and the global model),
    written to OUT (default RUN) as matrix.csv and matrix.json; returns the matrix and the summary."""
    paths = run_models(run_dir, list(packs))
    federated = paths[GLOBAL_ROW]
    states = run_local_states(federated) if federated.is_file() else None
    start = time.perf_counter()
    matrix = cross_district_matrix(paths, packs, split, {GLOBAL_ROW: states}, env=env, on_row=on_row)
    summary = {"split": split, **matrix.summary(), "own_batchnorm": states is not None,
               "seconds": round(time.perf_counter() - start, 1),
               "models": {name: str(path) if path.is_file() else None for name, path in paths.items()},
               "environment": (env or default_environment()).record()}
    write_matrix(out_dir if out_dir is not None else run_dir, matrix, summary)
    return matrix, summary


def write_matrix(out_dir: str | Path, matrix: DistrictMatrix, summary: Mapping | None = None) -> Path:
    """OUT/matrix.csv (header `model,<district>...`, names guarded by csv_cell, F1 as the results tables write
    it, blank when absent) and OUT/matrix.json (`summary`, by default the matrix's), each atomically."""
    out_dir = Path(out_dir)
    header = [MODEL_COLUMN] + [csv_cell(d) for d in matrix.districts]
    body = ([csv_cell(name)] + [format_value(v) for v in row] for name, row in matrix.rows.items())
    write_text_atomic(out_dir / MATRIX_NAME, csv_text(header, body))
    write_json_atomic(out_dir / MATRIX_SUMMARY_NAME, dict(summary) if summary is not None else matrix.summary())
    return out_dir / MATRIX_NAME


def remove_matrix(run_dir: str | Path) -> None:
    """Drop a run's matrix files (its models are about to be retrained: the cells would be stale)."""
    for name in (MATRIX_NAME, MATRIX_SUMMARY_NAME):
        (Path(run_dir) / name).unlink(missing_ok=True)


def read_matrix(path: str | Path) -> DistrictMatrix:
    """A matrix.csv as write_matrix wrote it; DataError naming the file (and line) on bad content."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    districts = header[1:]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: a column name repeats")

    def convert(row: dict) -> tuple[str, list[float | None]]:
        if any(row.get(d) is None for d in districts):
            raise ValueError("too few cells")
        return row[MODEL_COLUMN], [read_f1(row[d]) for d in districts]

    rows = read_csv_rows(path, (MODEL_COLUMN,), convert)
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a model's row repeats")
    return DistrictMatrix([read_cell(d) for d in districts], dict(rows))


def mean_matrix(matrices: Sequence[DistrictMatrix]) -> DistrictMatrix | None:
    """The cell-wise mean over seeds (a cell blank in one seed is the mean of the others; districts and rows in
    the first seed's order, then the others'); None for none."""
    if not matrices:
        return None
    districts = list(dict.fromkeys(d for m in matrices for d in m.districts))
    names = list(dict.fromkeys(n for m in matrices for n in m.rows))
    cells = {(n, d): [] for n in names for d in districts}
    for m in matrices:
        for name, row in m.rows.items():
            for district, value in zip(m.districts, row):
                if value is not None and math.isfinite(value):
                    cells[name, district].append(value)
    return DistrictMatrix(districts, {n: [_mean(cells[n, d]) for d in districts] for n in names})
