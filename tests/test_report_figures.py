"""The report's figures: drawn, readable titles, the per-round curves and markers they are drawn from."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from report_runs import NAMES, districts, make_run

from nfed.report.build import make_study_report
from nfed.report.comparison import study_comparison
from nfed.report.figures import round_curves
from nfed.report.plots import _log_ticks, nice_range
from nfed.report.run import read_run

FIGURES = ("fig3_f1_samples.png", "fig3_gain_vs_samples.png", "fig4_before_after.png", "fig5_f1_per_round.png")


def word_gaps(image: Image.Image, box: tuple[int, int, int, int], min_width: int) -> int:
    """Blank column runs at least min_width wide between the first and last inked column of `box`."""
    ink = (np.asarray(image.convert("L").crop(box)) < 128).any(axis=0)
    inked = np.flatnonzero(ink)
    runs, blank = [], 0
    for column in ink[inked[0]:inked[-1] + 1]:
        if column:
            runs, blank = runs + ([blank] if blank else []), 0
        else:
            blank += 1
    return sum(1 for r in runs if r >= min_width)


@pytest.mark.parametrize("seeds", [1, 2])
def test_figures_are_drawn(tmp_path, seeds):
    runs = [make_run(tmp_path / f"s{k}", districts(0.05 * k)) for k in range(seeds)]
    comparison = make_study_report(runs, tmp_path / "report")
    assert [p.rsplit("/", 1)[-1] for p in comparison.summary["figures"]] == list(FIGURES)
    for name in FIGURES:
        with Image.open(tmp_path / "report" / name) as image:
            assert image.size[0] >= 900 and image.getextrema() != ((255, 255),) * 3


def test_title_keeps_its_spaces(tmp_path):
    """'Samples and local F1 per district (study Fig. 3)': every one of its 8 spaces is a visible gap (the
    10 px default font merged 'Samples and' into 'Samplesand')."""
    make_study_report([make_run(tmp_path / "run", districts())], tmp_path / "report")
    with Image.open(tmp_path / "report" / "fig3_f1_samples.png") as image:
        assert word_gaps(image, (0, 8, image.width, 36), min_width=4) == 8


def test_per_round_curves_and_markers(tmp_path):
    run = make_run(tmp_path / "run", districts(), rounds=4)   # F1 of district i in round r: f1_federated * r/4
    numbers, series, mean, markers = round_curves(study_comparison([read_run(run)]))
    assert numbers == [1, 2, 3, 4] and list(series) == NAMES
    assert series[NAMES[1]] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert mean == pytest.approx([0.635 * r / 4 for r in range(1, 5)])
    assert markers == [(3, "best round 3, kept"), (4, "stop after round 4")]
    seeds = study_comparison([read_run(make_run(tmp_path / f"s{k}", districts(), rounds=2 + k)) for k in range(2)])
    numbers, series, _, markers = round_curves(seeds)
    assert numbers == [1, 2, 3]
    # round 1: seed s0 gives f1/2, seed s1 f1/3; round 3 only s1
    assert series[NAMES[1]] == pytest.approx([(0.25 + 0.5 / 3) / 2, (0.5 + 1 / 3) / 2, 0.5])
    assert (1, "best round 1, kept (s0)") in markers and (3, "stop after round 3 (s1)") in markers


def test_no_rounds_no_round_figure(tmp_path):
    run = make_run(tmp_path / "run", districts())
    (run / "federated" / "rounds.jsonl").unlink()
    comparison = make_study_report([run], tmp_path / "report")
    assert not (tmp_path / "report" / "fig5_f1_per_round.png").exists() and len(comparison.summary["figures"]) == 3


def test_axis_helpers():
    assert _log_ticks(8, 54) == pytest.approx([5, 10, 20, 50, 100])
    assert _log_ticks(10, 20) == pytest.approx([10, 20])
    assert nice_range(-12.0, 240.0) == (-50.0, 250.0, 6)
