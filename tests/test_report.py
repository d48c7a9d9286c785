"""nfed report on hand-made study runs: the four columns, the headline and goals, seeds, the command line."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from report_runs import F1, NAMES, SAMPLES, districts, make_run

from nfed.cli import cli
from nfed.common.errors import DataError
from nfed.data.districts import load_districts
from nfed.report.build import make_report, make_study_report
from nfed.report.comparison import gain_pct, study_comparison
from nfed.report.run import read_run
from nfed.runs.results import read_results

T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}   # Student-t quantiles from a table


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run", districts())


def test_four_columns_and_headline(run, tmp_path):
    comparison = make_study_report([run], tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "table.csv").open()))
    assert [r["district"] for r in rows] == NAMES
    assert list(rows[0])[:10] == ["district", "samples", "f1_local", "f1_federated", "f1_personalised",
                                  "f1_centralised", "gain_pct", "gain_personalised_pct", "study_samples",
                                  "study_f1_local"]
    assert [float(r["gain_pct"]) for r in rows] == pytest.approx([50.0, 150.0, 10.0, -2.5])
    assert [float(r["gain_personalised_pct"]) for r in rows] == pytest.approx([55.0, 160.0, 16.67, 0.0], abs=0.01)
    s = comparison.summary
    assert (s["mean_f1_local"], s["mean_f1_federated"]) == pytest.approx((0.5, 0.635))
    assert (s["mean_f1_personalised"], s["mean_f1_centralised"]) == pytest.approx((0.66, 0.6825))
    assert s["gain_on_means_pct"] == pytest.approx(27.0) and s["mean_gain_pct"] == pytest.approx(51.875)
    assert s["gain_on_means_personalised_pct"] == pytest.approx(32.0)
    assert (s["improved"], s["improved_personalised"]) == (3, 4)
    gains = [50.0, 150.0, 10.0, -2.5]
    assert s["corr_samples_gain"] == pytest.approx(np.corrcoef(SAMPLES, gains)[0, 1])
    assert s["corr_samples_gain_strength"] == "strong negative"
    low, high = s["corr_samples_gain_interval"]
    assert -1.0 <= low <= s["corr_samples_gain"] <= high <= 1.0
    assert s["corr_f1_local_gain"] == pytest.approx(np.corrcoef(F1["local"], gains)[0, 1])
    # differences 0.2, 0.3, 0.06, -0.02: ranks 3, 4, 2, 1; W- = 1; 2 of 16 patterns have W- <= 1: p = 2 * 2/16
    test = s["wilcoxon"]["federated_vs_local"]
    assert (test["statistic"], test["higher"], test["lower"]) == (1.0, 3, 1)
    assert test["p_value"] == pytest.approx(0.25)
    assert set(s["wilcoxon"]) == {"federated_vs_local", "personalised_vs_local", "personalised_vs_federated"}
    assert s["study"]["mean_f1_local"] == pytest.approx(sum(d.f1_local for d in load_districts()[:4]) / 4)
    assert s["warnings"] == []


def test_goals(run, tmp_path):
    goals = {g["name"]: g for g in make_study_report([run], tmp_path / "r", figures=False).summary["goals"]}
    assert goals["improved"]["measured"] == "3/4" and goals["improved"]["met"] is False   # needs ceil(20/25*4) = 4
    assert goals["gain_on_means"]["met"] is True
    assert goals["corr_samples_gain"]["met"] is True
    assert goals["federated_near_centralised"]["value"] == pytest.approx(0.635 - 0.6825)
    assert goals["federated_near_centralised"]["met"] is True
    assert goals["personalised_at_best"]["value"] == 4 and goals["personalised_at_best"]["met"] is True
    markdown = (tmp_path / "r" / "table.md").read_text()
    assert "goal: federated F1 >= local F1 in >= 20/25 districts (4/4 here): 3/4: NO" in markdown
    assert "## Fairness" in markdown and "| test tiles |" in markdown


def test_missing_columns_are_left_out(tmp_path):
    run = make_run(tmp_path / "run", districts(), columns=("local", "federated"))
    comparison = make_study_report([run], tmp_path / "r", figures=False)
    assert comparison.columns == ("local", "federated")
    assert "f1_personalised" not in comparison.rows[0]
    goals = {g["name"]: g for g in comparison.summary["goals"]}
    assert goals["federated_near_centralised"]["met"] is None
    assert goals["personalised_at_best"]["measured"] == "not measured"
    assert "F1 personalised" not in (tmp_path / "r" / "table.md").read_text()


def test_old_six_column_results(tmp_path):
    run = make_run(tmp_path / "run", districts(), columns=("local", "federated"), old_format=True)
    assert set(read_results(run / "local" / "local.csv")[NAMES[0]]) == {"samples", "precision", "recall", "f1", "iou"}
    comparison = make_report(run / "local", run / "federated" / "federated.csv", tmp_path / "r")
    assert comparison.summary["improved"] == 3
    section = comparison.summary["fairness"][0]
    assert section["districts"][0]["local_stop"] is None and section["districts"][0]["test_tiles"] is None
    assert section["federation"]["rounds"] == 3   # from rounds.jsonl: there is no federated/summary.json
    assert any("local.csv: epochs_run, steps, stop, best_epoch" in w and "not recorded" in w
               for w in comparison.summary["warnings"])
    assert "not recorded" in (tmp_path / "r" / "table.md").read_text()
    assert (tmp_path / "r" / "fig5_f1_per_round.png").is_file()


def test_seeds_aggregation(tmp_path):
    # local F1 shifted by -0.1, 0, +0.1 over three seeds; federated the same in every seed
    runs = [make_run(tmp_path / f"seed{k}", districts(shift), columns=columns) for k, (shift, columns) in
            enumerate([(-0.1, ("local", "federated", "personalised", "centralised")),
                       (0.0, ("local", "federated", "personalised", "centralised")),
                       (0.1, ("local", "federated", "personalised"))])]
    comparison = make_study_report(runs, tmp_path / "report")
    assert comparison.columns == ("local", "federated", "personalised")   # centralised not in every seed
    assert len(comparison.seeds) == 3
    half = T_975[2] * 0.1 / math.sqrt(3)   # values x-0.1, x, x+0.1: s = 0.1
    row = comparison.rows[0]
    assert row["f1_local"] == pytest.approx(0.4)
    assert (row["f1_local_low"], row["f1_local_high"]) == pytest.approx((0.4 - half, 0.4 + half))
    assert (row["f1_federated_low"], row["f1_federated_high"]) == pytest.approx((0.6, 0.6))
    gains = [gain_pct(0.4 + shift, 0.6) for shift in (-0.1, 0.0, 0.1)]   # 100, 50, 20 %
    mean = sum(gains) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / 2)
    assert row["gain_pct_high"] == pytest.approx(mean + T_975[2] * sd / math.sqrt(3))
    assert row["gain_pct"] == pytest.approx(50.0)   # the gain of the seed means
    s = comparison.summary
    assert s["seeds"] == 3 and s["over_seeds"]["mean_f1_local"]["mean"] == pytest.approx(0.5)
    assert s["over_seeds"]["mean_f1_local"]["high"] == pytest.approx(0.5 + half)
    assert s["wilcoxon"]["federated_vs_local"]["p_value"] == pytest.approx(0.25)   # on the seed means
    assert [p["run"] for p in s["per_seed"]] == ["seed0", "seed1", "seed2"]
    assert all("wilcoxon" in p and "goals" in p for p in s["per_seed"])
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert len(saved["fairness"]) == 3 and saved["rows"][0]["f1_local_low"] == pytest.approx(0.4 - half)
    csv_header = (tmp_path / "report" / "table.csv").read_text().splitlines()[0].split(",")
    assert csv_header[2:5] == ["f1_local", "f1_local_low", "f1_local_high"]
    text = (tmp_path / "report" / "table.md").read_text()
    assert f"0.4000 ± {half:.4f}" in text and "### seed2" in text and "per seed p = " in text


def test_seed_warnings_name_their_run(tmp_path):
    capped = {NAMES[1]: {"local_stop": "cap"}}
    runs = [make_run(tmp_path / "a", districts()), make_run(tmp_path / "b", districts(**capped))]
    warnings = study_comparison([read_run(r) for r in runs]).summary["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("b: local training of 1 district(s) ended on the epoch cap")


def test_bad_inputs(tmp_path, run):
    with pytest.raises(DataError, match="not found"):
        read_results(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("district,f1\nX,1\n")
    with pytest.raises(DataError, match="missing column"):
        read_results(tmp_path / "bad.csv")
    other = make_run(tmp_path / "other", [{"name": "Atlantis-gu", "samples": 10, **{c: 0.5 for c in F1}}])
    with pytest.raises(DataError, match="no district in common"):
        make_report(run / "local", other / "federated", tmp_path / "r")
    with pytest.raises(DataError, match="run folder not found"):
        read_run(tmp_path / "absent")
    (run / "federated" / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="summary.json: not valid JSON"):
        read_run(run)


def test_report_command_line(tmp_path):
    unfair = {NAMES[0]: {"local_stop": "cap"}, NAMES[2]: {"test_tiles": 12}}
    run = make_run(tmp_path / "run", districts(**unfair), federation={"stop_rule": "budget"})
    result = CliRunner().invoke(cli, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert NAMES[0] in result.stdout and "mean F1 local -> federated: 0.5000 -> 0.6350" in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3 and all(line.startswith("warning: ") for line in warnings)
    assert "epoch cap" in warnings[0] and "round budget" in warnings[1] and "test split too small" in warnings[2]
    for name in ("table.csv", "table.md", "summary.json", "fig3_f1_samples.png", "fig3_gain_vs_samples.png",
                 "fig4_before_after.png", "fig5_f1_per_round.png"):
        assert (tmp_path / "rep" / name).is_file(), name
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["warnings"][0].startswith("local training")


def test_report_command_line_seeds_and_files(tmp_path):
    runs = [make_run(tmp_path / f"s{k}", districts(0.05 * k)) for k in range(2)]
    result = CliRunner().invoke(cli, ["report", "--run", str(runs[0]), "--run", str(runs[1]),
                                      "--out", str(tmp_path / "rep"), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "2 seeds (s0, s1)" in result.stdout and not (tmp_path / "rep" / "fig4_before_after.png").exists()
    old_style = CliRunner().invoke(cli, ["report", "--local", str(runs[0] / "local"), "--federated",
                                         str(runs[0] / "federated" / "federated.csv"), "--personalised",
                                         str(runs[0] / "personalised"), "--centralised", str(runs[0] / "central"),
                                         "--out", str(tmp_path / "rep2"), "--no-figures"])
    assert old_style.exit_code == 0, old_style.output
    assert "centralised 0.6825" in old_style.stdout


@pytest.mark.parametrize("args, message", [
    (["--run", "RUN", "--local", "RUN/local"], "either --run"),
    (["--local", "RUN/local"], "both --local and --federated"),
    (["--run", "RUN/none"], "run folder not found"),
    (["--local", "RUN/none", "--federated", "RUN/federated"], "local.csv: results file not found"),
])
def test_report_command_line_errors(tmp_path, args, message):
    make_run(tmp_path / "run", districts())
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    result = CliRunner().invoke(cli, ["report", *args, "--out", str(tmp_path / "rep")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
