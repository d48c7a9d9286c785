"""What vs where: TrainConfig (what the server sends) apart from RunEnvironment (device, precision), the
environment passed explicitly and recorded in the outputs, and files of the previous version still read."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_federation import INITIAL, PACKS, FakeTrainConfig, fake_evaluate, fake_train
from test_training import synthetic_pack

from nfed.common.backend import CPU
from nfed.common.errors import CheckpointError, ConfigError
from nfed.core.functions.parallel import ENV_THREADS, num_workers
from nfed.federation.client import evaluate_weights, host_state, make_round_setup, train_round
from nfed.federation.config import FederationConfig
from nfed.federation.server import federate
from nfed.gpu.precision import get_precision, precision
from nfed.model.checkpoint import load_checkpoint, save_checkpoint
from nfed.training.environment import RunEnvironment
from nfed.training.trainer import TrainConfig, build_model, model_from_checkpoint


def test_environment_round_trip_and_checks():
    env = RunEnvironment("cpu", "TF32")
    assert env.precision == "tf32" and RunEnvironment.from_dict(env.to_dict()) == env
    assert env.device is CPU and env.to_dict() == {"device": "cpu", "precision": "tf32"}   # on GPU i: test_seams.py
    with pytest.raises(ConfigError, match="bad precision 'fp8'"):
        RunEnvironment("cpu", "fp8")
    with pytest.raises(ConfigError, match="unknown key.*threads"):
        RunEnvironment.from_dict({"device": "cpu", "precision": "fp32", "threads": 2})
    with precision("bf16"):
        assert RunEnvironment.from_options("cpu").precision == "bf16"   # the precision in force (--precision)
    before = get_precision()
    with RunEnvironment("cpu", "bf16").active():
        assert get_precision() == "bf16"
    assert get_precision() == before


def test_a_checkpoint_of_the_previous_version_with_device_in_its_config_still_loads(tmp_path):
    """train-local checkpoints of the previous version kept `device` among the training config's keys."""
    config = TrainConfig(width=2)
    weights = host_state(build_model(config))
    old = {**config.to_dict(), "device": "cuda:0", "tile": 32, "district": "Jung-gu"}
    save_checkpoint(tmp_path / "old.h5", weights, config=old)
    model, checkpoint = model_from_checkpoint(tmp_path / "old.h5")
    assert checkpoint.config["device"] == "cuda:0"
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(value), weights[name])
    save_checkpoint(tmp_path / "odd.h5", weights, config={**old, "colour": "blue"})
    with pytest.raises(CheckpointError, match="odd.h5: checkpoint config is invalid.*colour"):
        model_from_checkpoint(tmp_path / "odd.h5")


def test_a_federated_run_of_the_previous_version_resumes(tmp_path):
    """A global.h5 written before the run environment (train config with `device`, no `environment`)."""
    config = FederationConfig(rounds=1, eps=0.0)
    hooks = dict(train_fn=fake_train, evaluate_fn=fake_evaluate, initial_weights=INITIAL, evaluate_test=False)
    federate(PACKS, tmp_path / "run", FakeTrainConfig(), config, **hooks)
    path = tmp_path / "run" / "global.h5"
    saved = load_checkpoint(path)
    old_config = {**saved.config, "train": {**saved.config["train"], "device": "cpu"}}
    del old_config["environment"]
    save_checkpoint(path, saved.model_state, optimizer_state=saved.optimizer_state, config=old_config,
                    metrics=saved.metrics, round=saved.round, extra=saved.extra)
    result = federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=2, eps=0.0),
                      resume=True, **hooks)
    assert [r["round"] for r in result.rounds] == [1, 2]


def test_the_environment_is_recorded_in_the_run_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_THREADS, "3")   # the CPU threads nfed's ops use are recorded with the environment
    env = RunEnvironment("cpu", "tf32")
    federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), train_fn=fake_train,
             evaluate_fn=fake_evaluate, initial_weights=INITIAL, evaluate_test=False, env=env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["environment"] == {"device": "cpu", "precision": "tf32", "cpu_threads": 3}
    assert load_checkpoint(tmp_path / "run" / "global.h5").config["environment"] == env.record()


def test_a_client_trains_in_the_environment_it_is_given(tmp_path):
    pack = synthetic_pack(tmp_path / "Jung-gu.h5", counts=(4, 2, 2), tile=32)
    config = TrainConfig(width=2, batch_size=4, epochs=1)
    weights = host_state(build_model(config))
    setup = make_round_setup(config, 1, 1)
    before = get_precision()
    result = train_round(weights, setup, pack, env=RunEnvironment("cpu", "bf16"))
    assert (result.metrics["device"], result.metrics["precision"]) == ("cpu", "bf16")
    assert result.metrics["cpu_threads"] == num_workers()
    assert get_precision() == before   # the client's precision does not leak into the process
    assert evaluate_weights(result.weights, setup, pack, env=RunEnvironment("cpu", "bf16"))["samples"] == 2
    with pytest.raises(ConfigError, match="unknown key.*device"):   # the set-up carries no device any more
        train_round(weights, {**setup, "config": {**setup["config"], "device": "cpu"}}, pack)
