"""The round loop with fake clients (deadline, rejection, failures, sampling, resume, client state, workers),
and a tiny real federation end to end (3 districts, 2 rounds) including resume equality."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

from nfed.common.errors import CheckpointError, ConfigError
from nfed.federation.client import ClientResult
from nfed.federation.config import FederationConfig, load_client_speeds
from nfed.federation.runners import select_clients
from nfed.federation.server import Federation, federate
from nfed.runs.runfolder import read_rounds
from nfed.training.environment import RunEnvironment

TARGETS = {"A-gu": 1.0, "B-gu": 2.0, "C-gu": 4.0}
SAMPLES = {"A-gu": 10, "B-gu": 30, "C-gu": 60}


@dataclass
class FakeTrainConfig:
    lr: float = 0.5
    seed: int = 0

    def to_dict(self):
        return asdict(self)


def fake_train(global_weights, setup, pack_path, *, optimizer_state=None, env=None, seconds=None,
               poison=()):
    """Moves every weight halfway to the district's target; deterministic, instant."""
    district = Path(pack_path).stem
    lr = setup["config"]["lr"]
    weights = {k: (v + lr * (TARGETS[district] - v)).astype(v.dtype) for k, v in global_weights.items()}
    if district in poison:
        weights["w"] = weights["w"].copy()
        weights["w"][0] = np.nan
    step = 0 if optimizer_state is None else int(optimizer_state["step"])
    return ClientResult(weights, SAMPLES[district],
                        {"train_loss": 1.0, "val_loss": 1.0, "val_f1": 0.5,
                         "wall_time_s": (seconds or {}).get(district, 1.0), "received_step": step},
                        {"step": np.asarray(step + 1)} if setup.get("keep_optimizer_state") else None)


def fake_evaluate(weights, setup, pack_path, *, split="val", env=None):
    loss = float(abs(weights["w"].mean() - 3.0))
    return {"loss": loss, "f1": 1.0 / (1.0 + loss), "precision": 0.5, "recall": 0.5, "iou": 0.3, "samples": 5}


PACKS = {name: Path(f"/nonexistent/{name}.h5") for name in TARGETS}
# the protocol these tests were written for (the defaults before issue 30): no warm-up, no loss rule, loss kept
OLD_PROTOCOL = {"warmup_rounds": 0, "patience_rounds": 0, "select_by": "loss", "local_epochs": 1}
INITIAL = {"w": np.zeros(3, np.float32), "bn.running_var": np.ones(2, np.float32)}


def _run(tmp_path, name="run", train=fake_train, resume=False, **options):
    config = FederationConfig(**{"rounds": 2, **OLD_PROTOCOL, **options})
    return federate(PACKS, tmp_path / name, FakeTrainConfig(), config, resume=resume, train_fn=train,
                    evaluate_fn=fake_evaluate, initial_weights=INITIAL)


def test_one_round_is_the_sample_weighted_average(tmp_path):
    result = _run(tmp_path, rounds=1)
    # every client moves 0 -> target/2: (10*0.5 + 30*1 + 60*2) / 100 = 1.55
    np.testing.assert_allclose(result.global_weights["w"], np.full(3, 1.55), rtol=1e-6)
    np.testing.assert_allclose(result.global_weights["bn.running_var"],
                               np.full(2, (10 * 1.0 + 30 * 1.5 + 60 * 2.5) / 100), rtol=1e-6)
    records = read_rounds(tmp_path / "run" / "rounds.jsonl")
    assert [r["round"] for r in records] == [1]
    assert records[0]["answered"] == ["A-gu", "B-gu", "C-gu"]
    assert "budget" in records[0]["stop"]
    assert set(records[0]["global_val"]) == set(TARGETS)
    rows = (tmp_path / "run" / "federated.csv").read_text().splitlines()
    assert rows[0].startswith("district,samples,precision,recall,f1,iou,train_samples") and len(rows) == 4


def test_late_client_dropped_by_simulated_speed(tmp_path):
    def timed(*args, **kwargs):
        return fake_train(*args, seconds={"A-gu": 2.0, "B-gu": 2.0, "C-gu": 2.0}, **kwargs)

    speeds = {"A-gu": 1.0, "B-gu": 1.0, "C-gu": 0.25}   # C-gu: 2 s / 0.25 = 8 s simulated
    result = _run(tmp_path, train=timed, rounds=1, deadline=5.0, client_speeds=speeds)
    record = result.rounds[0]
    assert record["late"] == ["C-gu"] and record["answered"] == ["A-gu", "B-gu"]
    assert record["clients"]["C-gu"]["simulated_seconds"] == pytest.approx(8.0)
    # only A and B are averaged: (10*0.5 + 30*1) / 40
    np.testing.assert_allclose(result.global_weights["w"], np.full(3, 35 / 40), rtol=1e-6)


def test_nan_client_rejected_and_crashing_client_skipped(tmp_path):
    def flaky(global_weights, setup, pack_path, **kwargs):
        if Path(pack_path).stem == "B-gu":
            raise RuntimeError("disk on fire\nsecond line")
        return fake_train(global_weights, setup, pack_path, poison=("C-gu",), **kwargs)

    result = _run(tmp_path, train=flaky, rounds=1)
    record = result.rounds[0]
    assert record["answered"] == ["A-gu"]
    assert "NaN" in record["rejected"]["C-gu"]
    assert record["failed"]["B-gu"] == "RuntimeError: disk on fire"
    np.testing.assert_allclose(result.global_weights["w"], np.full(3, 0.5), rtol=1e-6)


def test_min_clients_keeps_previous_weights(tmp_path):
    def only_a(global_weights, setup, pack_path, **kwargs):
        if Path(pack_path).stem != "A-gu":
            raise RuntimeError("offline")
        return fake_train(global_weights, setup, pack_path, **kwargs)

    result = _run(tmp_path, train=only_a, rounds=1, min_clients=2)
    assert result.rounds[0]["kept_previous"] is True
    assert result.rounds[0]["norm_difference"] is None
    np.testing.assert_array_equal(result.global_weights["w"], INITIAL["w"])


def test_fraction_sampling_is_seeded():
    names = [f"D{i}" for i in range(25)]
    first = select_clients(names, 0.2, seed=3, round_number=1)
    assert len(first) == 5 and first == select_clients(names, 0.2, seed=3, round_number=1)
    assert first != select_clients(names, 0.2, seed=3, round_number=2)
    assert select_clients(names, 1.0, 0, 1) == names


def test_stop_rule_fires_and_is_logged(tmp_path):
    lines = []
    config = FederationConfig(rounds=50, eps=0.05)
    result = federate(PACKS, tmp_path / "run", FakeTrainConfig(), config, train_fn=fake_train,
                      evaluate_fn=fake_evaluate, initial_weights={"w": np.ones(3, np.float32)},
                      echo=lines.append)
    assert "norm difference" in result.stop_reason and len(result.rounds) < 50
    assert any("stopped after round" in line and "eps" in line for line in lines)
    assert lines[0].startswith("round 1/50: 3/3 answered")


@pytest.mark.parametrize("server_opt", ["fedavg", "fedadam"])
def test_resume_ends_with_the_same_weights(tmp_path, server_opt):
    full = _run(tmp_path, "full", rounds=4, server_opt=server_opt, client_state="keep")
    _run(tmp_path, "split", rounds=2, server_opt=server_opt, client_state="keep")
    resumed = _run(tmp_path, "split", rounds=4, server_opt=server_opt, client_state="keep", resume=True)
    np.testing.assert_array_equal(full.global_weights["w"], resumed.global_weights["w"])
    assert [r["round"] for r in read_rounds(tmp_path / "split" / "rounds.jsonl")] == [1, 2, 3, 4]
    # kept client state travels from round to round (and across the resume)
    assert resumed.rounds[-1]["clients"]["A-gu"]["received_step"] == 3
    states = sorted(p.name for p in (tmp_path / "split" / "client_state").iterdir())
    assert states == ["A-gu.r0004.h5", "B-gu.r0004.h5", "C-gu.r0004.h5"]


def test_resume_refuses_changed_settings_and_corrupt_checkpoint(tmp_path):
    _run(tmp_path, rounds=1)
    with pytest.raises(ConfigError, match="local_epochs"):
        _run(tmp_path, rounds=2, local_epochs=2, resume=True)
    (tmp_path / "run" / "global.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="global.h5"):
        _run(tmp_path, rounds=2, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _run(tmp_path, "empty", rounds=2, resume=True)


def test_client_speeds_profiles_and_files(tmp_path):
    names = list(TARGETS)
    assert load_client_speeds("uniform", names) == {n: 1.0 for n in names}
    assert load_client_speeds("study", names) == {"A-gu": 1.0, "B-gu": 0.5, "C-gu": 0.25}
    (tmp_path / "s.json").write_text(json.dumps({"B-gu": 0.5}))
    assert load_client_speeds(str(tmp_path / "s.json"), names)["B-gu"] == 0.5
    (tmp_path / "s.csv").write_text("district,speed\nC-gu,0.1\n")
    assert load_client_speeds(str(tmp_path / "s.csv"), names) == {"A-gu": 1.0, "B-gu": 1.0, "C-gu": 0.1}
    (tmp_path / "bad.csv").write_text("C-gu,-1\n")
    with pytest.raises(ConfigError, match="> 0"):
        load_client_speeds(str(tmp_path / "bad.csv"), names)
    with pytest.raises(ConfigError, match="neither a profile"):
        load_client_speeds("turbo", names)


HANGING_CLIENT = textwrap.dedent('''
    import time
    from pathlib import Path
    from nfed.federation.client import ClientResult

    def train(global_weights, setup, pack, optimizer_state=None, env=None):
        name = Path(pack).stem
        if name == "C-gu":
            time.sleep(600)
        if name == "B-gu":
            raise ValueError("broken pack")
        return ClientResult({k: v + 1 for k, v in global_weights.items()}, 10, {"wall_time_s": 0.0,
                            "where": f"{env.device}/{env.precision}" if env else "none"})
''')


def test_worker_mode_kills_a_hung_client_at_the_deadline(tmp_path, monkeypatch):
    from nfed.federation.worker import WorkerRunner

    (tmp_path / "hangclient.py").write_text(HANGING_CLIENT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + ":".join(sys.path))
    config = FederationConfig(rounds=1, workers=3, deadline=6.0)
    runner = WorkerRunner(3, tmp_path / "run" / "work", client_function="hangclient:train")
    started = time.monotonic()
    federation = Federation(PACKS, tmp_path / "run", FakeTrainConfig(), config, evaluate_fn=fake_evaluate,
                            initial_weights=INITIAL, runner=runner, env=RunEnvironment("cpu", "bf16"))
    result = federation.run()
    assert time.monotonic() - started < 30
    record = result.rounds[0]
    assert record["clients"]["A-gu"]["where"] == "cpu/bf16"   # the environment travels with the worker's task
    assert record["late"] == ["C-gu"] and "deadline" in record["clients"]["C-gu"]["reason"]
    assert record["failed"] == {"B-gu": "ValueError: broken pack"}
    assert record["answered"] == ["A-gu"]
    np.testing.assert_array_equal(result.global_weights["w"], np.ones(3))
    assert not (tmp_path / "run" / "work" / "round-1").exists()


# ------------------------------------------------------------------------------- real clients, tiny

@pytest.fixture(scope="module")
def tiny_packs(tmp_path_factory):
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise
    from nfed.runs.packs import find_packs

    root = tmp_path_factory.mktemp("tiny")
    synthesise(root / "synth", scale=0.002, tile=32, seed=1, districts="Gangseo-gu,Nowon-gu,Jung-gu",
               min_per_district=6)
    pack_folder(root / "synth", root / "packs", seed=1)
    return find_packs(root / "packs")


def _tiny_config():
    from nfed.training.trainer import profile_config

    return profile_config("demo", width=2, batch_size=4, lr=1e-3)


def test_tiny_federation_end_to_end_and_resume_is_exact(tiny_packs, tmp_path):
    lines = []
    config = FederationConfig(rounds=2, server_opt="fedavgm", client_state="keep", local_epochs=1)
    full = federate(tiny_packs, tmp_path / "full", _tiny_config(), config, echo=lines.append)
    assert [r["answered"] for r in full.rounds] == [list(tiny_packs)] * 2
    assert all(r["norm_difference"] > 0 for r in full.rounds)
    assert sum(line.startswith("round ") for line in lines) == 2
    rows = (tmp_path / "full" / "federated.csv").read_text().splitlines()
    assert rows[0].startswith("district,samples,precision,recall,f1,iou,train_samples") and len(rows) == 4
    import csv

    for row in csv.DictReader((tmp_path / "full" / "federated.csv").open()):
        # two rounds of one local epoch each, batch 4: the client work the table records
        assert int(row["epochs_run"]) == 2 and int(row["steps"]) == 2 * -(-int(row["train_samples"]) // 4)
        assert int(row["test_pixels"]) == int(row["test_tiles"]) * 32 * 32 > 0
    record = full.rounds[-1]
    assert set(record["global_val"]) == set(tiny_packs)
    assert {"train_loss", "val_loss", "val_f1", "num_samples"} <= set(record["clients"]["Gangseo-gu"])

    # killed after round 1, resumed: the same weights bit for bit
    federate(tiny_packs, tmp_path / "split", _tiny_config(), FederationConfig(
        rounds=1, server_opt="fedavgm", client_state="keep", evaluate_rounds=False, local_epochs=1),
        evaluate_test=False)
    resumed = federate(tiny_packs, tmp_path / "split", _tiny_config(), config, resume=True)
    assert full.global_weights.keys() == resumed.global_weights.keys()
    for name, value in full.global_weights.items():
        np.testing.assert_array_equal(value, resumed.global_weights[name], err_msg=name)
    from nfed.model.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "split" / "global.h5")
    assert saved.round == 2 and any(k.startswith("server.velocity.") for k in saved.extra)


def test_federate_command_line(tiny_packs, tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    data_dir = next(iter(tiny_packs.values())).parent
    runner = CliRunner()
    result = runner.invoke(cli, ["federate", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                                 "--rounds", "1", "--width", "2", "--batch-size", "4", "--quiet",
                                 "--no-round-eval", "--client-speeds", "study", "--deadline", "1000"])
    assert result.exit_code == 0, result.output
    assert "round 1/1: 3/3 answered" in result.output and "federated.csv" in result.output
    missing = runner.invoke(cli, ["federate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 1 and "packs folder not found" in missing.output
    assert "Traceback" not in missing.output
    (tmp_path / "run" / "global.h5").write_bytes(b"garbage")
    corrupt = runner.invoke(cli, ["federate", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                                  "--rounds", "2", "--width", "2", "--batch-size", "4", "--quiet", "--resume"])
    assert corrupt.exit_code == 1 and "Traceback" not in corrupt.output
    assert "global.h5: unreadable or corrupt checkpoint" in corrupt.output.splitlines()[-1]


def test_best_round_is_kept_and_scored_and_the_summary_says_how_the_run_ended(tmp_path):
    """The fake global mean walks 1.55, 2.33, 2.71, 2.91, 3.00, 3.05, ...: the validation loss |mean - 3| is
    lowest after round 5. The val-loss rule (patience 1) ends the run after round 6; round 5 is scored."""
    result = _run(tmp_path, rounds=20, patience_rounds=1)
    assert [r["round"] for r in result.rounds] == [1, 2, 3, 4, 5, 6]
    assert result.best_round == 5 and result.stop_rule == "val_loss"
    best = result.rounds[4]
    np.testing.assert_allclose(result.best_weights["w"].mean(), 3.0, atol=0.01)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["best_round"] == 5 and summary["stop_rule"] == "val_loss"
    assert summary["best_mean_val_loss"] == pytest.approx(best["mean_val_loss"])
    rows = (tmp_path / "run" / "federated.csv").read_text().splitlines()
    f1 = float(rows[1].split(",")[4])
    assert f1 == pytest.approx(1.0 / (1.0 + abs(float(result.best_weights["w"].mean()) - 3.0)), rel=1e-5)
    from nfed.model.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "run" / "best.h5")
    assert saved.round == 5
    np.testing.assert_array_equal(saved.model_state["w"], result.best_weights["w"])
    # a budget-ended run says so; resuming with a larger budget continues and keeps the best round
    short = _run(tmp_path, name="short", rounds=3)
    assert short.stop_rule == "budget" and short.best_round == 3
    longer = _run(tmp_path, name="short", rounds=7, resume=True)
    assert longer.best_round == 5 and longer.stop_rule == "budget"
