"""Training API used by train-local and the federation client: config, seeding, early stopping, evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nfed.common.errors import ConfigError
from nfed.data.packwriter import write_pack
from nfed.data.reader import DistrictPack
from nfed.data.synthscene import generate_tile
from nfed.data.synthstyle import district_style
from nfed.training import trainer as training
from nfed.training.trainer import PROFILES, TrainConfig, build_model, build_optimizer, evaluate, fit


def synthetic_pack(path: Path, district: str = "Jung-gu", counts=(8, 4, 4), tile: int = 32,
                   seed: int = 0) -> Path:
    """A small district pack of nfed synth tiles (train, val, test counts), written in memory."""
    style = district_style(district, seed)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("train", "val", "test"), counts):
        tiles = [generate_tile(style, rng, tile) for _ in range(n)]
        splits[split] = (np.stack([t.past for t in tiles]), np.stack([t.current for t in tiles]),
                         np.stack([t.mask() for t in tiles]), [f"{split}_{i:03d}" for i in range(n)])
    return write_pack(path, district, splits, source="test")


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory) -> Path:
    return synthetic_pack(tmp_path_factory.mktemp("packs") / "Jung-gu.h5")


def _tiny(**changes) -> TrainConfig:
    return TrainConfig(width=2, lr=1e-3, batch_size=4, epochs=2, patience=2).replace(**changes)


def test_config_roundtrip_validation_and_profiles():
    config = TrainConfig(width=4, lr=3e-4, seed=7)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown key.*tile, unknown"):
        TrainConfig.from_dict({**config.to_dict(), "tile": 64, "unknown": 1})
    # what files store beside the fields (older ones a `device` too) is set aside by the compatibility step only
    saved = {**config.to_dict(), "tile": 64, "district": "A-gu", "device": "cuda:0", "environment": {}}
    assert TrainConfig.from_saved(saved) == config
    with pytest.raises(ConfigError, match="unknown key.*: unknown$"):
        TrainConfig.from_saved({**saved, "unknown": 1})
    assert "device" not in config.to_dict()
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    paper = TrainConfig(**PROFILES["paper"])
    assert (paper.width, paper.lr, paper.batch_size, paper.epochs, paper.patience) == (64, 1e-4, 8, 50, 3)
    assert paper.optimizer == "adam"
    assert set(PROFILES) == {"demo", "paper"} and set(training.PROFILE_TILES) == set(PROFILES)
    assert training.profile_config("demo", lr=None, epochs=2).epochs == 2
    for bad in ({"classes": 3}, {"lr": 0}, {"batch_size": 0}, {"optimizer": "rmsprop"}, {"lambda_rec": -1}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="profile"):
        training.profile_config("huge")


def test_same_seed_gives_identical_weights_and_other_seed_differs(pack_path, tmp_path):
    def run(seed):
        config = _tiny(seed=seed)
        model = build_model(config)
        with DistrictPack(pack_path) as pack:
            fit(model, build_optimizer(model, config), pack, config, epochs=2, early_stopping=False)
        return model.state_dict()

    first, second, other = run(5), run(5), run(6)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_fit_reports_history_log_and_throughput(pack_path, tmp_path):
    config = _tiny()
    model = build_model(config)
    log = tmp_path / "log" / "epochs.jsonl"
    with DistrictPack(pack_path) as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=2, log_path=log)
    assert result.epochs_run == 2 and len(result.history) == 2 and result.num_train_samples == 8
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) and 0 <= row["val_f1"] <= 1
               for row in result.history)
    assert result.images_per_s > 0 and result.wall_time_s > 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and lines[0]["district"] == "Jung-gu"
    assert set(result.best_state) == set(model.state_dict())


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(pack_path, monkeypatch):
    """Validation losses are scripted so the stopping epoch is known: best at epoch 2, patience 3."""
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.1])
    snapshots = []
    real_evaluate = training.evaluate

    def fake_evaluate(model, pack, split="test", batch_size=8, **kwargs):
        snapshots.append(model.state_dict())
        return {**real_evaluate(model, pack, split, batch_size, **kwargs), "loss": next(scripted)}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    config = _tiny(patience=3)
    model = build_model(config)
    with DistrictPack(pack_path) as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=10)
    assert result.epochs_run == 5 and result.stop_epoch == 5 and result.best_epoch == 2
    assert result.best_val_loss == 0.5
    restored = model.state_dict()
    for name, value in snapshots[1].items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
        np.testing.assert_array_equal(result.best_state[name], value, err_msg=name)


def test_patience_steps_keeps_short_epochs_training(pack_path, monkeypatch):
    """With epochs of few steps, patience also counts optimiser steps: 3 stale epochs are not enough when
    they hold fewer than patience_steps steps; the stop comes one epoch later, at the step count."""
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97])
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda model, pack, split="test", batch_size=8, **kw:
                        {**real_evaluate(model, pack, split, batch_size, **kw), "loss": next(scripted)})
    with DistrictPack(pack_path) as pack:
        per_epoch = -(-pack.num_samples("train") // 4)
        config = _tiny(patience=3, patience_steps=3 * per_epoch + 1)
        model = build_model(config)
        result = fit(model, build_optimizer(model, config), pack, config, epochs=10)
    assert result.stop_epoch == 6 and result.best_epoch == 2 and result.stop == "early-stop"
    assert result.steps == 6 * per_epoch


def test_a_client_round_validates_only_its_last_epoch_and_trains_the_same(pack_path, monkeypatch):
    """validate_last_only skips the validations nothing reads; the training (and so the weights) is the same."""
    calls = []
    real_evaluate = training.evaluate

    def counting(model, pack, split="test", batch_size=8, **kwargs):
        calls.append(split)
        return real_evaluate(model, pack, split, batch_size, **kwargs)

    monkeypatch.setattr(training, "evaluate", counting)
    states = []
    for last_only in (False, True):
        config = _tiny()
        model = build_model(config)
        with DistrictPack(pack_path) as pack:
            result = fit(model, build_optimizer(model, config), pack, config, epochs=3, early_stopping=False,
                         validate_last_only=last_only)
        states.append(model.state_dict())
        assert [row["val_loss"] is None for row in result.history] == [last_only, last_only, False]
    assert calls == ["val"] * 3 + ["val"]
    for name, value in states[0].items():
        np.testing.assert_array_equal(states[1][name], value, err_msg=name)


def test_without_early_stopping_all_epochs_run_and_weights_are_the_last(pack_path, monkeypatch):
    scripted = iter([1.0, 2.0, 3.0])
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda model, pack, split="test", batch_size=8, **kw:
                        {**real_evaluate(model, pack, split, batch_size, **kw), "loss": next(scripted)})
    config = _tiny(patience=1)
    model = build_model(config)
    with DistrictPack(pack_path) as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=3, early_stopping=False,
                     epoch_seed_offset=6)
    assert result.epochs_run == 3 and result.stop_epoch is None
    final = model.state_dict()
    for name, value in result.best_state.items():
        np.testing.assert_array_equal(final[name], value)


def test_evaluate_pools_the_split_and_leaves_the_model_unchanged(pack_path):
    config = _tiny()
    model = build_model(config)
    before = model.state_dict()
    with DistrictPack(pack_path) as pack:
        scores = evaluate(model, pack, "test", batch_size=3)
        masks = np.concatenate(list(pack.iter_masks("test")))
    assert scores["samples"] == 4
    assert scores["tp"] + scores["fp"] + scores["fn"] + scores["tn"] == masks.size
    assert scores["tp"] + scores["fn"] == int(np.count_nonzero(masks))
    assert scores["loss"] == pytest.approx(scores["ce_loss"] + config.lambda_rec * scores["rec_loss"], rel=1e-5)
    assert model.training
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_training_lowers_the_loss(pack_path):
    config = _tiny(lr=1e-2, augment=False)
    model = build_model(config)
    with DistrictPack(pack_path) as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=5, early_stopping=False)
    losses = [row["train_loss"] for row in result.history]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0]
