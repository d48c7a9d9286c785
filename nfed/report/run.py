"""Reading a study's run folders: each column's results table, the federation's rounds and summary, and the
centralised model's summary, as one Run per seed.

Inputs: one study run folder per seed (what `nfed demo --out RUN` writes): RUN/local/local.csv,
RUN/federated/{federated.csv, rounds.jsonl, summary.json}, and when present RUN/personalised/personalised.csv,
RUN/central/{central.csv, summary.json} and RUN/federated/heldout.csv (districts held out of training).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nfed.common.errors import DataError
from nfed.federation.heldout import HELDOUT_NAME, read_heldout
from nfed.runs.results import FILE_NAMES, read_results, study_table
from nfed.runs.runfolder import ROUNDS_NAME, SUMMARY_NAME, read_rounds
from nfed.training.matrix import MATRIX_NAME, DistrictMatrix, read_matrix

COLUMNS = ("local", "federated", "personalised", "centralised")
# The results table (nfed.runs.results) behind each column: the kind of table it is.
TABLE_KINDS = {"local": "local", "federated": "federated", "personalised": "personalised", "centralised": "central"}

def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; {} when the file is absent (older runs did not write it)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


@dataclass
class Run:
    """One seed's results: column -> district -> record, the federation's rounds and summary.json, the
    centralised model's summary.json, the file each column came from, the cross-district matrix (RUN/matrix.csv)
    and the held-out districts' scores (heldout.csv rows) when the run has them."""

    label: str
    results: dict[str, dict[str, dict]]
    sources: dict[str, Path]
    rounds: list[dict] = field(default_factory=list)
    federation: dict = field(default_factory=dict)
    central: dict = field(default_factory=dict)
    matrix: DistrictMatrix | None = None
    heldout: list[dict] | None = None


def _results_file(path: Path, name: str) -> Path:
    return path if path.suffix.lower() == ".csv" and not path.is_dir() else path / name


def read_columns(local: str | Path, federated: str | Path, personalised: str | Path | None = None,
                 centralised: str | Path | None = None, label: str = "run") -> Run:
    """A Run from results folders (or their CSV files); local and federated are required."""
    given = {"local": local, "federated": federated, "personalised": personalised, "centralised": centralised}
    sources = {c: _results_file(Path(p), FILE_NAMES[TABLE_KINDS[c]]) for c, p in given.items() if p is not None}
    results = {c: read_results(path) for c, path in sources.items()}
    federated_dir = sources["federated"].parent
    central = read_json_object(sources["centralised"].parent / SUMMARY_NAME) if "centralised" in sources else {}
    heldout = read_heldout(federated_dir / HELDOUT_NAME) if (federated_dir / HELDOUT_NAME).is_file() else None
    return Run(label, results, sources, rounds=read_rounds(federated_dir / ROUNDS_NAME),
               federation=read_json_object(federated_dir / SUMMARY_NAME), central=central, heldout=heldout)


def read_run(run_dir: str | Path, label: str | None = None) -> Run:
    """A Run from a study run folder; personalised/, central/ and matrix.csv are read when present."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    folders = {c: study_table(run_dir, kind).parent for c, kind in TABLE_KINDS.items()}
    optional = {c: folders[c] for c in ("personalised", "centralised")}
    run = read_columns(folders["local"], folders["federated"],
                       **{c: p for c, p in optional.items() if p.exists()}, label=label or run_dir.name)
    run.matrix = read_matrix(run_dir / MATRIX_NAME) if (run_dir / MATRIX_NAME).is_file() else None
    return run
