"""The study's report on disk: REPORT/table.csv, table.md, summary.json, the figures and report.html.

run.py reads the run folders, comparison.py compares the columns, fairness.py checks the comparison, text.py
renders it, figures.py draws it, html.py puts it all on one page; this module writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.report.comparison import Comparison, study_comparison
from nfed.report.figures import draw_figures
from nfed.report.heldout import heldout_line, heldout_summary
from nfed.report.html import report_html
from nfed.report.matrix import matrix_line, matrix_summary
from nfed.report.run import read_columns, read_run
from nfed.report.text import comparison_text, table_csv, table_markdown

HTML_NAME = "report.html"


def write_report(comparison: Comparison, out_dir: str | Path, *, figures: bool = True,
                 demo: dict | None = None) -> Comparison:
    """REPORT/table.csv, table.md, the figures, report.html and summary.json (the summary with the rows).
    `demo`: settings and stage_seconds for report.html (`nfed demo` passes its own; else RUN/demo.json).
    Runs with a cross-district matrix (RUN/matrix.csv) add its numbers: summary.json's "matrix", a line of
    table.md and a section of report.html; so do runs with held-out districts (RUN/federated/heldout.csv:
    summary.json's "held_out")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = matrix_summary(comparison.runs)
    if matrix is not None:
        comparison.summary["matrix"] = matrix
    heldout = heldout_summary(comparison.runs)
    if heldout is not None:
        comparison.summary["held_out"] = heldout
    write_text_atomic(out_dir / "table.csv", table_csv(comparison))
    write_text_atomic(out_dir / "table.md", _with_matrix_line(table_markdown(comparison), comparison))
    if figures:
        comparison.summary["figures"] = [str(p) for p in draw_figures(comparison, out_dir)]
    write_text_atomic(out_dir / HTML_NAME, report_html(comparison, demo))
    write_json_atomic(out_dir / "summary.json", {**comparison.summary, "rows": comparison.rows})
    return comparison


def make_report(local: str | Path, federated: str | Path, out_dir: str | Path, *,
                personalised: str | Path | None = None, centralised: str | Path | None = None,
                figures: bool = True, demo: dict | None = None) -> Comparison:
    """The report of one seed from its results folders (or CSV files)."""
    run = read_columns(local, federated, personalised, centralised)
    return write_report(study_comparison([run]), out_dir, figures=figures, demo=demo)


def make_study_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, figures: bool = True,
                      demo: dict | None = None) -> Comparison:
    """The report of one or several study run folders (one per seed)."""
    names = [Path(d).name for d in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    runs = [read_run(d, label) for d, label in zip(run_dirs, labels)]
    return write_report(study_comparison(runs), out_dir, figures=figures, demo=demo)


def table_text(comparison: Comparison) -> str:
    """The table, headline, goals and fairness section (and the matrix's and held-out districts' lines) as plain
    text for the terminal."""
    return _with_matrix_line(comparison_text(comparison), comparison)


def _with_matrix_line(text: str, comparison: Comparison) -> str:
    """`text` with the cross-district matrix's line and the held-out districts' after a blank line, when the runs
    have them."""
    matrix, heldout = comparison.summary.get("matrix"), comparison.summary.get("held_out")
    lines = ([matrix_line(matrix)] if matrix is not None else []) + ([heldout_line(heldout)] if heldout else [])
    if not lines:
        return text
    return text.rstrip("\n") + "\n\n" + "\n".join(lines) + ("\n" if text.endswith("\n") else "")
