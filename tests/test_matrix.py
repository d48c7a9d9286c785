"""The cross-district matrix (issue 24, item 4): every district's local model and the global model scored on every
district's test split, checked against `evaluate` run directly; its CSV and summary, the report's heatmap, and the
global row under fedbn scored with each district's own BatchNorm."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from report_runs import districts, make_run
from test_flower import TILE, make_tiny_packs

from nfed.cli import cli
from nfed.federation.norm_policy import merge, split
from nfed.model.checkpoint import save_checkpoint
from nfed.runs.runfolder import state_file
from nfed.training.trainer import TrainConfig, build_model, evaluate, model_from_checkpoint

DISTRICTS = ("Gangnam-gu", "Gangdong-gu", "Gwangjin-gu")
CONFIG = TrainConfig(width=4, batch_size=2)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny packs, each district in its own synthetic style (as the demo's)."""
    return make_tiny_packs(tmp_path_factory.mktemp("packs"), DISTRICTS, counts=((2, 1, 3),) * 3)


@pytest.fixture(scope="module")
def states(packs) -> dict[str, dict]:
    """Weights of W-Nets trained for a few epochs (an untrained one predicts the same everywhere): a model per
    district on its own pack (seeds 2, 3, 4) and a "global" one (seed 1, whose scores the BatchNorm of the fedbn
    test below changes)."""
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import build_optimizer, fit

    out = {}
    for name, district, seed in [*((d, d, i + 2) for i, d in enumerate(DISTRICTS)), ("global", DISTRICTS[0], 1)]:
        config = CONFIG.replace(seed=seed, lr=1e-2)
        model = build_model(config)
        with DistrictPack(packs[district]) as pack:
            fit(model, build_optimizer(model, config), pack, config, epochs=3, early_stopping=False)
        out[name] = model.state_dict()
    return out


def _run(root: Path, states: dict, *, local=(0, 1), policy: str = "shared") -> Path:
    """A study run folder: local models of the first `local` districts and a global model."""
    for i in local:
        save_checkpoint(root / "local" / DISTRICTS[i] / "best.h5", states[DISTRICTS[i]],
                        config={**CONFIG.to_dict(), "tile": TILE, "district": DISTRICTS[i]})
    save_checkpoint(root / "federated" / "best.h5", states["global"], round=2,
                    config={"train": {**CONFIG.to_dict(), "tile": TILE}, "federation": {"norm_policy": policy}})
    return root


def _cells(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def test_cells_are_evaluate_run_directly_and_a_missing_model_is_a_blank_row(packs, states, tmp_path):
    from nfed.training.matrix import GLOBAL_ROW, cross_district_matrix

    run = _run(tmp_path / "run", states)
    paths = {d: run / "local" / d / "best.h5" for d in DISTRICTS} | {GLOBAL_ROW: run / "federated" / "best.h5"}
    matrix = cross_district_matrix(paths, packs)
    assert matrix.districts == list(DISTRICTS) and list(matrix.rows) == [*DISTRICTS, GLOBAL_ROW]
    for name, path in paths.items():
        if not path.is_file():
            assert matrix.rows[name] == [None] * 3        # Gwangjin-gu has no local model: blank, no error
            continue
        from nfed.data.reader import DistrictPack

        model, _ = model_from_checkpoint(path)
        for j, district in enumerate(DISTRICTS):
            with DistrictPack(packs[district]) as pack:
                assert matrix.rows[name][j] == pytest.approx(evaluate(model, pack, "test")["f1"], abs=1e-12)
    assert len({value for row in matrix.rows.values() for value in row if value is not None}) > 1


def test_summary_means_of_the_diagonal_and_the_rest():
    from nfed.training.matrix import DistrictMatrix

    matrix = DistrictMatrix(["a", "b", "c"], {"a": [0.9, 0.1, 0.2], "b": [0.3, 0.8, None], "c": [None] * 3,
                                              "global": [0.5, 0.6, 0.7]})
    summary = matrix.summary()
    assert summary["in_district_f1"] == pytest.approx(0.85)
    assert summary["out_of_district_f1"] == pytest.approx(0.2)          # 0.1, 0.2, 0.3 (None left out)
    assert summary["gap"] == pytest.approx(0.65)
    assert summary["global_f1"] == pytest.approx(0.6)
    assert (summary["in_district_cells"], summary["out_of_district_cells"], summary["local_models"]) == (2, 3, 2)


def test_nfed_matrix_writes_the_csv_and_its_summary(packs, states, tmp_path):
    run = _run(tmp_path / "run", states)
    data = next(iter(packs.values())).parent
    result = CliRunner().invoke(cli, ["matrix", "--run", str(run), "--data", str(data)])
    assert result.exit_code == 0, result.output
    header, rows = _cells(run / "matrix.csv")
    assert header == ["model", *DISTRICTS] and list(rows) == [*DISTRICTS, "global"]
    assert all(len(row) == len(DISTRICTS) for row in rows.values())    # (models + 1) x (districts + 1) with header
    assert rows["Gwangjin-gu"] == ["", "", ""]
    values = {name: [float(v) for v in row if v] for name, row in rows.items()}
    diagonal = [float(rows[d][j]) for j, d in enumerate(DISTRICTS[:2])]
    off = [float(rows[d][j]) for d in DISTRICTS[:2] for j in range(3) if DISTRICTS[j] != d]
    summary = json.loads((run / "matrix.json").read_text())
    assert summary["in_district_f1"] == pytest.approx(np.mean(diagonal), abs=1e-6)
    assert summary["out_of_district_f1"] == pytest.approx(np.mean(off), abs=1e-6)
    assert summary["gap"] == pytest.approx(np.mean(diagonal) - np.mean(off), abs=1e-6)
    assert summary["global_f1"] == pytest.approx(np.mean(values["global"]), abs=1e-6)
    assert "in-district" in result.output and "out-of-district" in result.output


def test_nfed_matrix_refuses_to_write_over_its_inputs(packs, states, tmp_path):
    run = _run(tmp_path / "run", states)
    data = next(iter(packs.values())).parent
    result = CliRunner().invoke(cli, ["matrix", "--run", str(run), "--data", str(data), "--out", str(data)])
    assert result.exit_code == 1 and result.output.startswith("Error: --out") and "input" in result.output
    assert not (data / "matrix.csv").exists()


def test_under_fedbn_the_global_row_uses_each_districts_own_batchnorm(packs, states, tmp_path):
    from nfed.data.reader import DistrictPack
    from nfed.training.matrix import GLOBAL_ROW, cross_district_matrix, run_local_states

    run = _run(tmp_path / "run", states, policy="fedbn")
    global_state = states["global"]
    own = {}
    for i, district in enumerate(DISTRICTS):   # each district's BatchNorm after round 1 (the kept round is 2)
        local = {k: (v * (1.5 + i) + 0.1 * i).astype(np.float32) for k, v in split(global_state, "fedbn")[1].items()}
        save_checkpoint(state_file(run / "federated", district, 1), local, round=1)
        own[district] = local
    kept = run_local_states(run / "federated" / "best.h5")
    assert kept == (run / "federated", 2)
    matrix = cross_district_matrix({GLOBAL_ROW: run / "federated" / "best.h5"}, packs, local_states={GLOBAL_ROW: kept})
    model, plain = build_model(CONFIG), []
    for j, district in enumerate(DISTRICTS):
        with DistrictPack(packs[district]) as pack:
            model.load_state_dict(merge(global_state, own[district]))
            expected = evaluate(model, pack, "test")["f1"]
            model.load_state_dict(global_state)
            plain.append(evaluate(model, pack, "test")["f1"])
        assert matrix.rows[GLOBAL_ROW][j] == pytest.approx(expected, abs=1e-12)
    assert matrix.rows[GLOBAL_ROW] != pytest.approx(plain, abs=1e-6)    # the districts' own BatchNorm mattered
    # the command finds the states beside the checkpoint itself
    result = CliRunner().invoke(cli, ["matrix", "--run", str(run), "--data", str(next(iter(packs.values())).parent)])
    assert result.exit_code == 0, result.output
    _, rows = _cells(run / "matrix.csv")
    assert [float(v) for v in rows["global"]] == pytest.approx(matrix.rows[GLOBAL_ROW], abs=1e-6)
    assert json.loads((run / "matrix.json").read_text())["own_batchnorm"] is True


def test_report_shows_the_heatmap_with_names_escaped_and_the_mean_over_seeds(tmp_path):
    from nfed.report.build import make_study_report
    from nfed.training.matrix import DistrictMatrix, write_matrix

    names = ["<b>x</b>", "=cmd()"]
    runs = []
    for k, shift in enumerate((0.0, 0.2)):
        run = make_run(tmp_path / f"seed-{k}", districts())
        write_matrix(run, DistrictMatrix(names, {names[0]: [0.5 + shift, 0.1], names[1]: [0.2, 0.7 + shift],
                                                 "global": [0.6, None]}))
        runs.append(run)
    assert _cells(runs[0] / "matrix.csv")[0] == ["model", "<b>x</b>", "'=cmd()"]   # formula text guarded
    make_study_report(runs, tmp_path / "report", figures=False)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Cross-district matrix" in page and "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    cells = re.findall(r'<td class="(hm\d)( diag)?">([^<]*)</td>', page)
    assert sorted(text for _, diag, text in cells if diag) == ["0.60", "0.80"]   # the diagonal marked, seed means
    assert ("hm1", "", "0.10") in cells and '<td class="hm6">0.60</td>' in page and "<td>-</td>" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["matrix"]
    assert summary["in_district_f1"] == pytest.approx(0.7)                  # cells: the mean over the two seeds
    assert summary["out_of_district_f1"] == pytest.approx(0.15)
    assert summary["gap"] == pytest.approx(0.55) and summary["seeds"] == 2
    assert "Cross-district matrix" in (tmp_path / "report" / "table.md").read_text()


def test_report_without_a_matrix_has_no_such_section(tmp_path):
    from nfed.report.build import make_study_report

    run = make_run(tmp_path / "run", districts())
    make_study_report([run], tmp_path / "report", figures=False)
    assert "Cross-district matrix" not in (tmp_path / "report" / "report.html").read_text()
    assert "matrix" not in json.loads((tmp_path / "report" / "summary.json").read_text())


def test_a_damaged_matrix_csv_is_a_one_line_error_naming_it(tmp_path):
    run = make_run(tmp_path / "run", districts())
    (run / "matrix.csv").write_text("model,a,b\na,0.5,2.0\n")
    result = CliRunner().invoke(cli, ["report", "--run", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "matrix.csv: line 2" in result.output and "not in [0, 1]" in result.output
