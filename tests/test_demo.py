"""`nfed demo` end to end on a reduced study (4 districts, few tiles, epochs and rounds): layout, the four
columns, table, timing."""
from __future__ import annotations

import csv
import json

import pytest


@pytest.mark.slow
def test_reduced_demo_writes_the_whole_study(tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--scale", "0.008", "--districts", "Gangseo-gu,Eunpyeong-gu,Nowon-gu,Jung-gu",
            "--rounds", "3", "--epochs", "3", "--val-tiles", "4", "--test-tiles", "6", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for name in ("synth", "packs", "local", "federated", "personalised", "central", "report"):
        assert (out / name).is_dir()
    for table in ("local/local.csv", "federated/federated.csv", "personalised/personalised.csv",
                  "central/central.csv"):
        rows = list(csv.DictReader((out / table).open()))
        assert len(rows) == 4 and all(int(r["test_tiles"]) == 6 for r in rows), table
    rows = list(csv.DictReader((out / "report" / "table.csv").open()))
    assert [r["district"] for r in rows] == ["Gangseo-gu", "Nowon-gu", "Eunpyeong-gu", "Jung-gu"]
    assert all(0.0 <= float(r["f1_federated"]) <= 1.0 for r in rows)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["summary"]["districts"] == 4 and summary["total_seconds"] > 0
    assert set(summary["stage_seconds"]) == {"data", "local", "federated", "personalised", "central", "matrix",
                                             "report"}
    with (out / "matrix.csv").open() as handle:   # 4 local models and the global one on the 4 test splits
        assert [len(row) for row in csv.reader(handle)] == [5] * 6
    assert "Cross-district matrix" in (out / "report" / "report.html").read_text()
    assert summary["settings"]["epoch_cap"] == 3 * 3   # never below rounds x local epochs (3 by default)
    assert "mean F1 local -> federated" in result.output and "total wall time" in result.output
    # a rerun writes the same layout again (idempotent)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert list(csv.DictReader((out / "report" / "table.csv").open())) == rows


@pytest.mark.slow
def test_several_seeds_get_their_own_runs_and_one_aggregated_report(tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--scale", "0.002", "--districts", "Nowon-gu,Jung-gu", "--seeds", "2",
            "--rounds", "2", "--epochs", "2", "--val-tiles", "2", "--test-tiles", "3", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        assert (out / f"seed-{seed}" / "federated" / "federated.csv").is_file()
        assert (out / f"seed-{seed}" / "report" / "table.csv").is_file()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert len(summary["per_seed"]) == 2 and "over_seeds" in summary
    assert json.loads((out / "demo.json").read_text())["settings"]["seeds"] == [0, 1]
    # the two seeds trained different models on the same data
    local = [list(csv.DictReader((out / f"seed-{s}" / "local" / "local.csv").open())) for s in (0, 1)]
    assert [r["test_tiles"] for r in local[0]] == [r["test_tiles"] for r in local[1]]
    assert [r["f1"] for r in local[0]] != [r["f1"] for r in local[1]]


def test_run_columns_refuses_unknown_columns_and_personalised_without_federated(tmp_path):
    from nfed.demo import DemoSettings, _Stages, run_columns

    for columns in (("local", "nonsense"), ("personalised",)):
        with pytest.raises(ValueError, match="choose from"):
            run_columns(tmp_path, {}, DemoSettings(), 0, _Stages(lambda text: None), lambda text: None,
                        columns=columns)
