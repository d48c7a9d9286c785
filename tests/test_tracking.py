"""Experiment tracking (--track, nfed[track]): what a tracked run logs, read back through MLflow's own client."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfed.cli import cli

pytest.importorskip("flwr")
from test_flower import task_identity  # noqa: E402,F401  (a fixture the ServerApp test uses)

TINY = ("--width", "2", "--batch-size", "4", "--quiet")
DISTRICTS = ("Gangseo-gu", "Nowon-gu", "Jung-gu")


@pytest.fixture(scope="module")
def packs_dir(tmp_path_factory):
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise

    root = tmp_path_factory.mktemp("tracked")
    synthesise(root / "synth", scale=0.002, tile=32, seed=1, districts=",".join(DISTRICTS), min_per_district=6)
    pack_folder(root / "synth", root / "packs", seed=1)
    return root / "packs"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module's runs (MLflow creates its tables once: seconds)."""
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"


def _only_run(uri: str, command: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{command}'")]
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return client, runs[0]


def test_federate_logs_params_rounds_districts_and_artefacts(packs_dir, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["federate", "--data", str(packs_dir), "--out", str(tmp_path / "run"),
                                      "--rounds", "2", "--warmup-rounds", "2", *TINY, "--track", store])
    assert result.exit_code == 0, result.output
    client, run = _only_run(store, "federate")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["command"] == "federate" and params["env.device"] == "cpu"
    assert params["train.width"] == "2" and params["train.batch_size"] == "4" and params["federation.rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "mean_val_f1")
    assert sorted(metric.step for metric in history) == [1, 2]
    rounds = [line for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines() if line]
    assert len(rounds) == 2
    assert {f"val_f1/{d}" for d in DISTRICTS} <= set(run.data.metrics)
    rows = (tmp_path / "run" / "federated.csv").read_text().splitlines()[1:]
    logged = {row.split(",")[0]: float(row.split(",")[4]) for row in rows}
    assert {d: pytest.approx(run.data.metrics[f"test_f1/{d}"], abs=1e-6) for d in DISTRICTS} == logged
    artefacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "federated.csv", "rounds.jsonl"} <= artefacts


def test_train_local_all_logs_each_districts_row(packs_dir, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["train-local", "--data", str(packs_dir), "--all", "--out", str(tmp_path / "l"),
                                      "--epochs", "1", *TINY, "--track", store])
    assert result.exit_code == 0, result.output
    client, run = _only_run(store, "train-local")
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert {f"test_f1/{d}" for d in DISTRICTS} | {f"test_steps/{d}" for d in DISTRICTS} <= set(run.data.metrics)
    assert "local.csv" in {item.path for item in client.list_artifacts(run.info.run_id)}


def test_without_mlflow_track_says_in_one_line_what_to_install(packs_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)   # `import mlflow...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    result = CliRunner().invoke(cli, ["federate", "--data", str(packs_dir), "--out", str(tmp_path / "run"),
                                      "--rounds", "1", *TINY, "--track"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == ("Error: --track needs MLflow: pip install 'nfed[track]' (or pip "
                                                      "install mlflow-skinny sqlalchemy alembic)")
    assert not (tmp_path / "run" / "rounds.jsonl").exists()   # refused before any training


def test_the_default_store_is_a_sqlite_file_beside_the_run(tmp_path):
    from nfed.runs.tracking import metric_key, tracking_uri

    assert tracking_uri("", tmp_path / "run") == f"sqlite:///{(tmp_path / 'run' / 'mlruns.db').resolve()}"
    assert tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert metric_key("test_f1", "Jung-gu (north)") == "test_f1/Jung-gu _north_"
    assert metric_key("test_f1", "강남구") == "test_f1/강남구"


def test_mlflow_is_not_imported_without_track():
    code = ("import sys, nfed.cli, nfed.commands.options, nfed.runs.tracking, nfed.commands.federation, "
            "nfed.commands.model, nfed.commands.study, nfed.commands.demo; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


@pytest.mark.slow
def test_track_alone_keeps_the_store_beside_the_run(packs_dir, tmp_path, monkeypatch):
    """--track without a URI: RUN/mlruns.db and RUN/mlartifacts/, nothing in the working folder."""
    pytest.importorskip("mlflow")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["federate", "--data", str(packs_dir), "--out", str(run_dir), "--rounds", "1",
                                      "--no-round-eval", *TINY, "--track"])
    assert result.exit_code == 0, result.output
    client, run = _only_run(f"sqlite:///{run_dir / 'mlruns.db'}", "federate")
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").resolve().as_uri())
    assert "federated.csv" in {item.path for item in client.list_artifacts(run.info.run_id)}
    assert list(work.iterdir()) == []


def test_the_flower_serverapp_logs_its_rounds_when_the_app_says_so(store, tmp_path, task_identity):
    """`nfed flower-app --track URI` writes the URI into the run config; the ServerApp (serve over a loopback grid)
    logs its rounds and districts there; an app folder without the key (written before it) is not tracked."""
    from test_flower import WIDTH, LoopbackGrid, flat_run_config, make_tiny_packs

    from nfed.federation.config import FederationConfig
    from nfed.federation.flower.app import serve
    from nfed.federation.flower.config import settings_from_run_config
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs")
    grid = LoopbackGrid({20 + i: {"pack": str(path)} for i, path in enumerate(packs.values())})
    fed = FederationConfig(rounds=2, warmup_rounds=0, seed=1)
    config = flat_run_config(profile_config("demo", width=WIDTH, batch_size=2), fed, tmp_path / "run", track=store)
    serve(grid, config, echo=lambda line: None)
    client, run = _only_run(store, "flower")
    assert run.info.status == "FINISHED" and run.data.params["federation.rounds"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "mean_val_f1")) == [1, 2]
    assert {f"test_f1/{d}" for d in packs} <= set(run.data.metrics)
    untracked = {key: value for key, value in config.items() if key != "track"}
    assert settings_from_run_config(untracked).track is None
    assert settings_from_run_config({**config, "track": "beside-run"}).track == ""


def test_flower_app_writes_track_into_the_run_config(tmp_path):
    for options, written in (([], '"off"'), (["--track"], '"beside-run"'), (["--track", "http://mlflow.test:5000"],
                                                                               '"http://mlflow.test:5000"')):
        app = tmp_path / f"app{len(options)}"
        result = CliRunner().invoke(cli, ["flower-app", "--out", str(app), *options])
        assert result.exit_code == 0, result.output
        assert f"track = {written}" in (app / "pyproject.toml").read_text()


def test_more_parameters_and_metrics_than_one_mlflow_batch_takes_are_all_logged(store):
    """MLflow refuses a log_batch call with over 100 parameters or 1,000 metrics: the tracker splits them."""
    from nfed.runs.tracking import Tracker

    tracker = Tracker(store, "many-values").start({f"p{i:03d}": i for i in range(250)})
    tracker.log_metrics({f"m{i:04d}": float(i) for i in range(2100)}, step=3)
    tracker.end()
    _, run = _only_run(store, "many-values")
    assert len(run.data.params) == 250 and run.data.params["p249"] == "249"
    assert len(run.data.metrics) == 2100 and run.data.metrics["m2099"] == 2099.0
