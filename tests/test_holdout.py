"""Districts that never trained (issue 24, item 3): --hold-out keeps districts out of the federation's training
(never selected, never averaged, not in the stop rules' validation mean) yet scores them, before and after AdaBN
on their own training tiles (RUN/heldout.csv, checked against `nfed adapt` + `evaluate`), and the report shows them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from report_runs import districts, make_run
from test_federation import INITIAL, PACKS, SAMPLES, TARGETS, FakeTrainConfig, fake_evaluate, fake_train
from test_flower import DISTRICTS, WIDTH, make_tiny_packs

from nfed.cli import cli
from nfed.common.errors import ConfigError
from nfed.federation.config import FederationConfig, training_districts
from nfed.federation.heldout import HELDOUT_NAME, add_local_f1, read_heldout
from nfed.federation.server import federate
from nfed.runs.runfolder import read_rounds


def fake_adapt(weights, setup, pack_path, *, split="test", env=None, adapt_on=None):
    """The fake evaluation, 0.1 better after 'adaptation' (and only when asked to adapt on the train split)."""
    assert adapt_on == "train" and split == "test"
    scores = fake_evaluate(weights, setup, pack_path, split=split)
    return {**scores, "f1": scores["f1"] + 0.1}


def _run(tmp_path, name="run", resume=False, **options):
    config = FederationConfig(**{"rounds": 2, "hold_out": ("C-gu",), **options})
    return federate(PACKS, tmp_path / name, FakeTrainConfig(), config, resume=resume, train_fn=fake_train,
                    evaluate_fn=fake_evaluate, initial_weights=INITIAL, adapt_fn=fake_adapt)


def test_hold_out_is_checked_once_declared_and_repeatable():
    assert FederationConfig(hold_out=["A-gu", "B-gu"]).hold_out == ("A-gu", "B-gu")
    with pytest.raises(ConfigError, match="names a district twice"):
        FederationConfig(hold_out=("A-gu", "A-gu"))
    with pytest.raises(ConfigError, match="--hold-out: district name '../x' cannot be"):
        FederationConfig(hold_out=("../x",))
    with pytest.raises(ConfigError, match="holds a list"):
        FederationConfig(hold_out="A-gu")
    with pytest.raises(ConfigError, match="--hold-out Z-gu: no such district"):
        training_districts(list(TARGETS), ("Z-gu",))
    with pytest.raises(ConfigError, match="every district"):
        training_districts(["A-gu"], ("A-gu",))
    assert training_districts(list(TARGETS), ("B-gu",)) == ["A-gu", "C-gu"]
    for command in ("federate", "demo"):
        assert "--hold-out" in CliRunner().invoke(cli, [command, "--help"]).output
    assert "--hold-out" not in CliRunner().invoke(cli, ["flower-app", "--help"]).output


def test_a_held_out_district_never_trains_and_is_scored_before_and_after_adaptation(tmp_path):
    result = _run(tmp_path)
    records = read_rounds(tmp_path / "run" / "rounds.jsonl")
    assert records and all(r["selected"] == ["A-gu", "B-gu"] and "C-gu" not in r["clients"] for r in records)
    assert all(set(r["global_val"]) == {"A-gu", "B-gu"} for r in records)   # not in the stop rules' mean
    # FedAvg of A and B alone: (10 * 1 + 30 * 2) / 40 after halfway steps from 0, twice
    expected = 0.0
    for _ in range(2):
        expected = sum(SAMPLES[d] * (expected + 0.5 * (TARGETS[d] - expected)) for d in ("A-gu", "B-gu")) / 40
    np.testing.assert_allclose(result.global_weights["w"], expected, rtol=1e-6)
    assert {row["district"] for row in result.results} == set(TARGETS)   # still scored on its test split
    (row,) = read_heldout(tmp_path / "run" / HELDOUT_NAME)
    global_f1 = next(r["f1"] for r in result.results if r["district"] == "C-gu")
    assert row["district"] == "C-gu" and row["local_f1"] is None
    assert row["global_f1"] == pytest.approx(global_f1, abs=1e-6)
    assert row["adapted_f1"] == pytest.approx(global_f1 + 0.1, abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["hold_out"] == ["C-gu"]
    add_local_f1(tmp_path / "run", {"C-gu": 0.25, "A-gu": 0.9})
    assert read_heldout(tmp_path / "run" / HELDOUT_NAME)[0]["local_f1"] == 0.25


def test_resume_keeps_the_held_out_districts(tmp_path):
    _run(tmp_path, rounds=1)
    with pytest.raises(ConfigError, match="hold_out"):
        _run(tmp_path, resume=True, hold_out=("B-gu",))
    result = _run(tmp_path, resume=True)
    assert [r["selected"] for r in result.rounds] == [["A-gu", "B-gu"]] * 2


def test_min_clients_counts_the_districts_that_train(tmp_path):
    with pytest.raises(ConfigError, match="exceeds the 2 district"):
        _run(tmp_path, min_clients=3)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_packs(tmp_path_factory.mktemp("packs"), DISTRICTS, counts=((3, 2, 3),) * 3)


@pytest.mark.parametrize("policy", ["shared", "fedbn"])
def test_the_adapted_score_is_nfed_adapt_then_evaluate(packs, tmp_path, policy):
    """heldout.csv's adapted F1 = the kept global model adapted with `nfed adapt` on the district's train split,
    then scored on its test split (under fedbn with the global model's own, initial, BatchNorm)."""
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import evaluate, model_from_checkpoint

    data = packs[DISTRICTS[0]].parent
    run = tmp_path / "run"
    held = DISTRICTS[2]
    result = CliRunner().invoke(cli, ["federate", "--data", str(data), "--out", str(run), "--rounds", "1",
                                      "--width", str(WIDTH), "--batch-size", "2", "--lr", "0.01", "--eps", "0",
                                      "--norm-policy", policy, "--hold-out", held])
    assert result.exit_code == 0, result.output
    assert f"held out {held}: global F1" in result.output
    (row,) = read_heldout(run / HELDOUT_NAME)
    model = run / ("best.h5" if (run / "best.h5").is_file() else "global.h5")
    adapted = CliRunner().invoke(cli, ["adapt", "--model", str(model), "--data", str(packs[held]), "--out",
                                       str(tmp_path / "adapted.h5"), "--batch-size", "2"])
    assert adapted.exit_code == 0, adapted.output
    scores = {}
    for name, path in (("global_f1", model), ("adapted_f1", tmp_path / "adapted.h5")):
        net, _ = model_from_checkpoint(path)
        with DistrictPack(packs[held]) as pack:
            scores[name] = evaluate(net, pack, "test", batch_size=2)["f1"]
    assert row["global_f1"] == pytest.approx(scores["global_f1"], abs=1e-6)
    assert row["adapted_f1"] == pytest.approx(scores["adapted_f1"], abs=1e-6)
    assert all(held not in r["selected"] for r in read_rounds(run / "rounds.jsonl"))


def test_an_unknown_district_is_refused_in_one_line(packs, tmp_path):
    result = CliRunner().invoke(cli, ["federate", "--data", str(packs[DISTRICTS[0]].parent), "--out",
                                      str(tmp_path / "run"), "--rounds", "1", "--width", str(WIDTH),
                                      "--hold-out", "Nowhere-gu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == "Error: --hold-out Nowhere-gu: no such district among the 3 packs"


def _heldout_run(root: Path, rows: list[tuple[str, float | None, float, float]]) -> Path:
    make_run(root, districts())
    lines = ["district,local_f1,global_f1,adapted_f1"]
    lines += [f"{d},{'' if local is None else local},{g},{a}" for d, local, g, a in rows]
    (root / "federated" / HELDOUT_NAME).write_text("\n".join(lines) + "\n")
    return root


def test_the_report_has_a_section_for_districts_that_never_trained(tmp_path):
    from nfed.report.build import make_study_report, table_text

    runs = [_heldout_run(tmp_path / "seed-0", [("Jongno-gu", 0.5, 0.40, 0.50), ("Jung-gu", None, 0.30, 0.32)]),
            _heldout_run(tmp_path / "seed-1", [("Jongno-gu", 0.6, 0.45, 0.55)])]
    comparison = make_study_report(runs, tmp_path / "report", figures=False)
    held = json.loads((tmp_path / "report" / "summary.json").read_text())["held_out"]
    assert held["districts"] == ["Jongno-gu", "Jung-gu"] and held["seeds"] == 2 and held["pairs"] == 3
    assert held["gain"] == pytest.approx((0.10 + 0.02 + 0.10) / 3)
    assert held["global_f1"] == pytest.approx(1.15 / 3) and held["adapted_f1"] == pytest.approx(1.37 / 3)
    assert held["local_f1"] == pytest.approx(0.55) and held["improved"] == 3 and held["goal_met"] is True
    line = next(line for line in table_text(comparison).splitlines() if line.startswith("Districts that never"))
    assert "global model test F1 0.3833, after AdaBN on their own training tiles 0.4567 (gain +0.0733" in line
    assert "goal >= +0.05 met" in line
    assert line in (tmp_path / "report" / "table.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'id="heldout"' in page and "Districts that never trained" in page and "Jung-gu" in page


def test_a_report_without_held_out_districts_has_no_such_section(tmp_path):
    from nfed.report.build import make_study_report

    make_study_report([make_run(tmp_path / "run", districts())], tmp_path / "report", figures=False)
    assert "held_out" not in json.loads((tmp_path / "report" / "summary.json").read_text())
    assert 'id="heldout"' not in (tmp_path / "report" / "report.html").read_text()


def test_the_demo_records_its_held_out_districts_and_refuses_an_unknown_one_before_training(tmp_path):
    from nfed.demo import DemoSettings, run_demo

    settings = DemoSettings(districts="Jongno-gu,Jung-gu", hold_out=["Jung-gu"], quiet=True)
    assert settings.hold_out == ("Jung-gu",) and settings.to_dict()["hold_out"] == ["Jung-gu"]
    lines = []
    with pytest.raises(ConfigError, match="--hold-out Yongsan-gu: no such district among the 2 packs"):
        run_demo(tmp_path / "demo", DemoSettings(districts="Jongno-gu,Jung-gu", hold_out=("Yongsan-gu",),
                                                 scale=0.001, quiet=True), echo=lines.append)
    assert not (tmp_path / "demo" / "local").exists()


def test_the_demos_federated_column_writes_heldout_csv_with_the_local_models_f1(packs, tmp_path):
    from nfed.demo import DemoSettings, _Stages, run_columns
    from nfed.runs.results import read_results, study_table

    settings = DemoSettings(max_rounds=1, local_epochs=1, epochs=1, patience=1, warmup_rounds=0, jobs=1, quiet=True,
                            hold_out=(DISTRICTS[1],), matrix=False)
    lines = []
    run_columns(tmp_path, packs, settings, 0, _Stages(lines.append), lines.append, columns=("local", "federated"))
    (row,) = read_heldout(tmp_path / "federated" / HELDOUT_NAME)
    local = read_results(study_table(tmp_path, "local"))[DISTRICTS[1]]["f1"]
    assert row["district"] == DISTRICTS[1] and row["local_f1"] == pytest.approx(local, abs=1e-6)
    assert row["global_f1"] is not None and row["adapted_f1"] is not None
    records = read_rounds(tmp_path / "federated" / "rounds.jsonl")
    assert all(DISTRICTS[1] not in r["selected"] for r in records)


@pytest.mark.slow
def test_the_noniid_bench_holds_districts_out_together(tmp_path):
    from bench_scripts import load_bench

    bench = load_bench("bench_noniid")
    out = tmp_path / "grid"
    assert bench.main(["--out", str(out), "--test", "--seeds", "0", "--policies", "shared", "--hold-out-grid"]) == 0
    cell = out / "seed-0" / "shared-mu0-holdout2"   # 3 districts at --test: all but one held out
    facts = json.loads((cell / "cell.json").read_text())
    assert facts["columns"] == ["federated"] and len(facts["hold_out"]) == 2
    rows = read_heldout(cell / "federated" / HELDOUT_NAME)
    assert [r["district"] for r in rows] == facts["hold_out"] and all(r["local_f1"] is not None for r in rows)
    held = json.loads((out / "noniid.json").read_text())["held_out"]["shared-mu0-holdout2"]
    assert held["pairs"] == 2 and held["held_out"] == {"seed-0": facts["hold_out"]}
    assert "| shared-mu0-holdout2 | 1 |" in (out / "noniid.md").read_text()
