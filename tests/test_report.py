"""nfed report on hand-made local/federated results: the table, the summary numbers, the figures."""
from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from nfed.districts import load_districts
from nfed.errors import DataError
from nfed.report import compare, gain_pct, make_report, pearson, read_results


def _write(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["district", "samples", "precision", "recall", "f1", "iou"])
        for name, samples, f1 in rows:
            writer.writerow([name, samples, 0.5, 0.5, f1, 0.3])


@pytest.fixture
def runs(tmp_path):
    districts = load_districts()[:4]
    local = tmp_path / "local"
    fed = tmp_path / "fed"
    local.mkdir()
    fed.mkdir()
    # small districts start low and gain most; the largest loses a little
    _write(local / "local.csv", [(districts[0].name, 100, 0.4), (districts[1].name, 50, 0.2),
                                 (districts[2].name, 400, 0.6), (districts[3].name, 800, 0.8)])
    _write(fed / "federated.csv", [(districts[0].name, 100, 0.6), (districts[1].name, 50, 0.5),
                                   (districts[2].name, 400, 0.66), (districts[3].name, 800, 0.78)])
    rounds = [{"round": r, "global_val": {d.name: {"f1": 0.1 * r + i * 0.05, "loss": 1.0}
                                          for i, d in enumerate(districts)}} for r in (1, 2, 3)]
    (fed / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return local, fed, [d.name for d in districts]


def test_report_table_and_summary(runs, tmp_path):
    local, fed, names = runs
    comparison = make_report(local, fed, tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "table.csv").open()))
    assert [r["district"] for r in rows] == names
    assert list(rows[0]) == ["district", "samples", "f1_local", "f1_federated", "gain_pct"]
    assert float(rows[0]["gain_pct"]) == pytest.approx(50.0)
    assert float(rows[1]["gain_pct"]) == pytest.approx(150.0)
    summary = comparison.summary
    assert summary["mean_f1_local"] == pytest.approx(0.5)
    assert summary["mean_f1_federated"] == pytest.approx(0.635)
    assert summary["gain_on_means_pct"] == pytest.approx(27.0)
    assert summary["improved"] == 3
    assert summary["corr_samples_gain"] < -0.5
    assert summary["study"]["mean_f1_local"] == pytest.approx(
        sum(d.f1_local for d in load_districts()[:4]) / 4)
    assert summary["criteria"]["negative_correlation_ok"] and summary["criteria"]["mean_gain_ok"]
    assert not summary["criteria"]["improved_ok"]   # 3 of 4 < ceil(23/25 * 4) = 4
    markdown = (tmp_path / "report" / "table.md").read_text()
    assert "| study gain % |" in markdown and "3/4" in markdown
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["improved"] == 3 and len(saved["rows"]) == 4
    for name in ("fig3_f1_samples.png", "fig4_before_after.png", "fig5_f1_per_round.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.size[0] >= 800 and image.getextrema() != ((255, 255),) * 3


def test_helpers():
    assert gain_pct(0.5, 0.75) == pytest.approx(50.0)
    assert math.isinf(gain_pct(0.0, 0.3)) and gain_pct(0.0, 0.0) == 0.0
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([1, 2, 3, 4], [4, 3, math.inf, 1]) == pytest.approx(-1.0)


def test_bad_inputs(tmp_path, runs):
    local, fed, _ = runs
    with pytest.raises(DataError, match="not found"):
        read_results(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("district,f1\nX,1\n")
    with pytest.raises(DataError, match="missing column"):
        read_results(tmp_path / "bad.csv")
    other = tmp_path / "other.csv"
    _write(other, [("Atlantis-gu", 10, 0.5)])
    with pytest.raises(DataError, match="no district in common"):
        compare(read_results(local / "local.csv"), read_results(other))


def test_report_command_line(runs, tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    local, fed, names = runs
    result = CliRunner().invoke(cli, ["report", "--local", str(local), "--federated", str(fed / "federated.csv"),
                                      "--out", str(tmp_path / "rep"), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert names[0] in result.output and "mean F1 local -> federated" in result.output
    assert (tmp_path / "rep" / "table.csv").is_file() and not (tmp_path / "rep" / "fig4_before_after.png").exists()
    bad = CliRunner().invoke(cli, ["report", "--local", str(tmp_path / "none"), "--federated", str(fed),
                                   "--out", str(tmp_path / "rep2")])
    assert bad.exit_code == 1 and "local.csv" in bad.output and "Traceback" not in bad.output
