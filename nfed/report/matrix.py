"""The cross-district matrix in the report: over several seeds the cell-wise mean of the seeds' matrices (a cell
blank in one seed is the mean of the others), its summary numbers for summary.json, and its one line for
table.md and the terminal."""
from __future__ import annotations

from typing import Sequence

from nfed.report.run import Run
from nfed.runs.results import f1_text
from nfed.training.matrix import DistrictMatrix, mean_matrix

# Below this gap between in-district and out-of-district F1 the districts do not differ for these models.
NO_GAP = 0.01


def study_matrix(runs: Sequence[Run]) -> tuple[DistrictMatrix | None, int]:
    """The mean matrix of the runs that have one, and how many have one."""
    matrices = [run.matrix for run in runs if run.matrix is not None]
    return mean_matrix(matrices), len(matrices)


def matrix_summary(runs: Sequence[Run]) -> dict | None:
    """summary.json's "matrix": the mean matrix's summary numbers and the seeds behind it (None without one)."""
    matrix, seeds = study_matrix(runs)
    return None if matrix is None else {**matrix.summary(), "seeds": seeds, "runs": len(runs)}


def matrix_line(summary: dict) -> str:
    """One line: in-district vs out-of-district F1, the gap, the global model's mean."""
    seeds = f", mean over {summary['seeds']} seeds" if summary["seeds"] > 1 else ""
    line = (f"Cross-district matrix (test F1{seeds}): in-district {f1_text(summary['in_district_f1'])}, "
            f"out-of-district "
            f"{f1_text(summary['out_of_district_f1'])}, gap {f1_text(summary['gap'])}; global model "
            f"{f1_text(summary['global_f1'])}")
    if summary["gap"] is not None and summary["gap"] < NO_GAP:
        line += " (no in-district advantage: the districts' data do not differ for these models)"
    return line
