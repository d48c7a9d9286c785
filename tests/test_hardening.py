"""Issue 11, as an unlucky operator and an attacker: absurd numbers, damaged checkpoints and packs, hostile
client updates and confusing paths each end in one line naming the option or file, exit 1, nothing written.

Full disks, concurrent runs and killed processes are in test_run_safety.py; rogue Flower nodes in test_flower.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from test_cli_model import packs  # noqa: F401  (the module-scoped fixture: Jung-gu and Nowon-gu packs)
from test_training import synthetic_pack

from nfed.cli import cli
from nfed.common.errors import CheckpointError, ConfigError, DataError, TrainingError

TINY = ["--width", "2", "--batch-size", "4", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *needles):
    """Exit 1 with exactly one `Error:` line holding every needle (progress lines before it are fine)."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(packs, tmp_path_factory) -> Path:
    """A train-local run and a one-round federated run on the tiny packs."""
    runs = tmp_path_factory.mktemp("runs")
    result = invoke("train-local", "--data", packs, "--all", "--out", runs / "local", "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.output
    result = invoke("federate", "--data", packs, "--out", runs / "fed", "--rounds", "1", *TINY)
    assert result.exit_code == 0, result.output
    return runs


# ------------------------------------------------------------------------------------------ 1. numbers

@pytest.mark.parametrize("args, option", [
    (["train-local", "--data", "{packs}/Jung-gu.h5", "--lr", "inf"], "--lr inf"),
    (["train-local", "--data", "{packs}/Jung-gu.h5", "--lambda-rec", "nan"], "--lambda-rec nan"),
    (["train-local", "--data", "{packs}/Jung-gu.h5", "--epochs", "1e9"], "--epochs '1e9'"),
    (["federate", "--data", "{packs}", "--eps", "nan"], "--eps nan"),
    (["federate", "--data", "{packs}", "--seed", "-1"], "--seed -1"),
    (["federate", "--data", "{packs}", "--server-lr", "1e30"], "--server-lr 1e30"),
    (["federate", "--data", "{packs}", "--deadline", "-inf"], "--deadline -inf"),
    (["synth", "--jobs", "-3"], "--jobs -3"),
    (["flower-app", "--deadline", "-5"], "--deadline -5"),
    (["predict", "--model", "m.h5", "--past", "a.png", "--current", "b.png", "--batch-size", "0"], "--batch-size 0"),
])
def test_numeric_options_must_be_finite_and_in_range(packs, tmp_path, args, option):
    out = tmp_path / "out"
    result = invoke(*[a.format(packs=packs) for a in args], "--out", out)
    one_line_error(result, option, "must be")
    assert not out.exists()


def test_config_dataclasses_and_json_outputs_are_strict(tmp_path):
    from nfed.common import strict_json
    from nfed.common.atomic import write_json_atomic
    from nfed.federation.config import FederationConfig
    from nfed.federation.server_optim import build_server_optimizer
    from nfed.federation.stop_rules import StopRules
    from nfed.training.trainer import TrainConfig

    for bad in ({"lr": math.inf}, {"lambda_rec": math.nan}, {"seed": -1}, {"width": 2.5}, {"batch_size": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    for bad in ({"eps": math.nan}, {"server_lr": 1e30}, {"deadline": -5.0}, {"fraction": 0.0}, {"rounds": 0},
                {"client_speeds": {"A-gu": math.inf}}):
        with pytest.raises(ConfigError):
            FederationConfig(**bad)
    with pytest.raises(ConfigError):
        StopRules(delta=math.inf)
    with pytest.raises(ConfigError):
        build_server_optimizer("fedavgm", lr=1.0, momentum=1.0)
    assert TrainConfig(seed=3.0).seed == 3 and isinstance(TrainConfig(seed=3.0).seed, int)

    write_json_atomic(tmp_path / "m.json", {"loss": math.nan, "best": math.inf, "f1": np.float32(0.5)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "best": None, "f1": 0.5}
    with pytest.raises(ValueError, match="NaN"):
        strict_json.loads('{"loss": NaN}')


def test_training_that_diverges_stops_with_one_line_and_writes_nothing(packs, tmp_path):
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import TrainConfig, build_model, build_optimizer, fit

    config = TrainConfig(width=2, batch_size=4, epochs=1)
    model = build_model(config)
    dict(model.named_parameters())["encoder.e1.conv1.weight"].data[...] = np.inf
    with DistrictPack(packs / "Jung-gu.h5") as pack, pytest.raises(TrainingError, match="diverged"):
        fit(model, build_optimizer(model, config), pack, config, epochs=1)


# ------------------------------------------------------------------------------------------ 2. checkpoints

def _damaged_copy(source: Path, target: Path, name: str, value) -> Path:
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as f:
        del f["model"][name]
        f["model"][name] = value
    return target


def test_unusable_checkpoints_are_refused_by_name(trained, packs, tmp_path):
    from nfed.model.checkpoint import load_checkpoint
    from nfed.training.trainer import checkpoint_tile, model_from_checkpoint

    best = trained / "local" / "Jung-gu" / "best.h5"
    layer = "encoder.e1.conv1.weight"
    shape = load_checkpoint(best).model_state[layer].shape
    poisoned = np.zeros(shape, np.float32)
    poisoned.flat[3] = np.nan
    nan_file = _damaged_copy(best, tmp_path / "nan.h5", layer, poisoned)
    int_file = _damaged_copy(best, tmp_path / "int.h5", layer, np.zeros(shape, np.int64))
    var_file = _damaged_copy(best, tmp_path / "var.h5", "encoder.e1.bn1.running_var", -np.ones(2, np.float32))

    one_line_error(invoke("evaluate", "--model", nan_file, "--data", packs), str(nan_file), layer, "NaN")
    one_line_error(invoke("predict", "--model", nan_file, "--past", tmp_path / "a.png", "--current",
                          tmp_path / "a.png", "--out", tmp_path / "m.png"), "a.png")
    with pytest.raises(CheckpointError, match=f"{layer} has dtype int64, expected floating point"):
        load_checkpoint(int_file)
    with pytest.raises(CheckpointError, match="negative variances"):
        load_checkpoint(var_file)

    # a federated run: resume from a NaN global.h5 is refused, and its global.h5 records tile and profile
    fed = trained / "fed"
    model, checkpoint = model_from_checkpoint(fed / "global.h5")
    assert checkpoint_tile(checkpoint) == 32 and checkpoint.config["train"]["profile"] == "demo"
    broken = tmp_path / "broken-run"
    broken.mkdir()
    for name in ("rounds.jsonl", "federated.csv"):
        (broken / name).write_bytes((fed / name).read_bytes())
    _damaged_copy(fed / "global.h5", broken / "global.h5", layer, poisoned)
    one_line_error(invoke("federate", "--data", packs, "--out", broken, "--rounds", "2", "--resume", *TINY),
                   str(broken / "global.h5"), "NaN")

    # a train-local best.h5 where a global.h5 is expected
    misplaced = tmp_path / "misplaced"
    misplaced.mkdir()
    (misplaced / "global.h5").write_bytes(best.read_bytes())
    one_line_error(invoke("federate", "--data", packs, "--out", misplaced, "--resume", *TINY),
                   str(misplaced / "global.h5"), "train-local checkpoint of Jung-gu", "not the global model")


# ------------------------------------------------------------------------------------------ 3. packs

def _pack_with(path: Path, **arrays) -> Path:
    """A copy of a good pack whose train split has `arrays` (name -> array) instead of its own."""
    synthetic_pack(path, "Jung-gu", counts=(2, 1, 1), tile=32)
    with h5py.File(path, "r+") as f:
        for name, value in arrays.items():
            del f["train"][name]
            f["train"][name] = value
    return path


def test_packs_with_wrong_dtypes_or_mask_values_are_refused(tmp_path):
    from nfed.data.reader import DistrictPack

    floats = _pack_with(tmp_path / "floats.h5", past=np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    big_mask = _pack_with(tmp_path / "mask.h5", mask=np.full((2, 32, 32), 288, np.int64))
    with pytest.raises(DataError, match=r"floats.h5: dataset 'train/past' has dtype float32, expected uint8"):
        DistrictPack(floats)
    one_line_error(invoke("info", big_mask), "mask.h5", "'train/mask' has dtype int64, expected uint8")
    one_line_error(invoke("train-local", "--data", floats, "--out", tmp_path / "run", *TINY), "floats.h5", "float32")
    assert not (tmp_path / "run").exists()

    mask = np.zeros((2, 32, 32), np.uint8)
    mask[1, 5, 5] = 7
    seven = _pack_with(tmp_path / "seven.h5", mask=mask)
    with DistrictPack(seven) as pack:
        with pytest.raises(DataError, match=r"'train/mask' holds value 7 \(tile train_001\).*allows 0-4"):
            list(pack.batches("train", 2))
    one_line_error(invoke("info", seven), "seven.h5", "holds value 7")


# ------------------------------------------------------------------------------------------ 6. aggregation

def test_aggregator_rejects_hostile_updates_one_client_at_a_time():
    from nfed.federation.aggregator import FedAvgAggregator

    reference = {"w": np.zeros(3, np.float32), "bn.running_var": np.ones(2, np.float32)}
    good = {"w": np.ones(3, np.float32), "bn.running_var": np.ones(2, np.float32)}
    hostile = {
        "huge": ({**good, "w": np.full(3, 1e300)}, 5, "overflows float32"),
        "objects": ({**good, "w": np.array([1, "x", None], dtype=object)}, 5, "dtype object"),
        "integers": ({**good, "w": np.ones(3, np.int64)}, 5, "dtype int64"),
        "variance": ({**good, "bn.running_var": np.array([1.0, -0.5], np.float32)}, 5, "negative variances"),
        "list": ({**good, "w": [1.0, 2.0, 3.0]}, 5, "not an array"),
        "samples": (good, "12", "number of samples"),
        "boolean": (good, True, "number of samples"),
    }
    aggregator = FedAvgAggregator(reference)
    assert aggregator.add(good, 10, "honest")
    for client, (weights, samples, reason) in hostile.items():
        assert not aggregator.add(weights, samples, client), client
        assert reason in aggregator.rejected[client], aggregator.rejected[client]
    averaged = aggregator.finish()
    assert aggregator.accepted == ["honest"]
    np.testing.assert_array_equal(averaged["w"], np.ones(3, np.float32))


def test_unusable_server_step_keeps_the_previous_global_weights(tmp_path):
    from test_federation import PACKS, FakeTrainConfig, fake_evaluate

    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    def huge(global_weights, setup, pack_path, **_):
        from nfed.federation.client import ClientResult

        return ClientResult({k: np.full_like(v, 3e38) for k, v in global_weights.items()}, 10, {"wall_time_s": 0.0})

    initial = {"w": np.zeros(3, np.float32), "bn.running_var": np.ones(2, np.float32)}
    result = federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, server_lr=10.0),
                      train_fn=huge, evaluate_fn=fake_evaluate, initial_weights=initial)
    record = result.rounds[0]
    assert record["kept_previous"] and "server step gave unusable weights" in record["problem"]
    np.testing.assert_array_equal(result.global_weights["w"], initial["w"])


def test_a_malformed_worker_result_fails_only_that_client(tmp_path):
    from nfed.federation.client import ClientTask
    from nfed.federation.worker import WorkerRunner
    from nfed.model.checkpoint import save_checkpoint

    class Done:
        returncode = 0

    runner = WorkerRunner(2, tmp_path / "work")
    task = ClientTask("A-gu", Path("A-gu.h5"), {"round": 1})
    files = {"result": tmp_path / "r.json", "weights": tmp_path / "w.h5", "log": tmp_path / "log"}
    save_checkpoint(files["weights"], {"w": np.ones(3, np.float32)})
    for answer, reason in (({"num_samples": "lots"}, "no valid num_samples"), ([1, 2], "not a JSON object"),
                           ({"num_samples": 10, "metrics": "x"}, None)):
        files["result"].write_text(json.dumps(answer))
        outcome = runner._collect(task, Done(), 1.0, files)
        if reason is None:
            assert outcome.status == "ok" and outcome.result.metrics == {}
        else:
            assert outcome.status == "failed" and reason in outcome.reason, outcome.reason


# ------------------------------------------------------------------------------------------ 8. messages

def test_messages_say_what_the_path_is_and_leave_no_empty_folders(trained, packs, tmp_path):
    one_line_error(invoke("info", packs), f"{packs}: is a folder, not a pack", "Nowon-gu.h5, Jung-gu.h5")
    one_line_error(invoke("train-local", "--data", packs / "Jung-gu.h5", "--all", "--out", tmp_path / "r", *TINY),
                   "--all", "is a file", "drop --all")
    one_line_error(invoke("evaluate", "--model", trained / "fed", "--data", packs),
                   "is a folder", str(trained / "fed" / "global.h5"))
    one_line_error(invoke("evaluate", "--model", trained / "local", "--data", packs),
                   "is a folder", str(trained / "local" / "Jung-gu" / "best.h5"))

    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    best = trained / "local" / "Jung-gu" / "best.h5"
    one_line_error(invoke("predict", "--model", best, "--past", image, "--current", image, "--out",
                          tmp_path / "x.jpg"), "x.jpg", "lossless")
    assert not (tmp_path / "x.jpg").exists()
    result = invoke("predict", "--model", best, "--past", image, "--current", image, "--out", tmp_path / "x.tif")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "x.tif") as mask:
        assert mask.format == "TIFF"

    one_line_error(invoke("synth", "--out", tmp_path / "s" / "deep", "--districts", "Atlantis"), "Atlantis")
    one_line_error(invoke("federate", "--data", packs, "--out", tmp_path / "f" / "deep", "--resume", *TINY),
                   "nothing to resume")
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()
