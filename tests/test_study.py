"""The study's columns besides the federation: pooled data, centralised and personalised training, the
stop reasons and step counts each side records, and the federation's best round."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_training import synthetic_pack

from nfed.cli import cli
from nfed.data.reader import DistrictPack, PooledPacks
from nfed.model.checkpoint import load_checkpoint
from nfed.training.study import personalise_district, train_central
from nfed.training.trainer import TrainConfig, build_model, build_optimizer, fit

COUNTS = {"Gangseo-gu": (7, 3, 4), "Nowon-gu": (3, 2, 4), "Jung-gu": (5, 2, 4)}


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("packs")
    for seed, (district, counts) in enumerate(COUNTS.items()):
        synthetic_pack(folder / f"{district}.h5", district, counts=counts, tile=16, seed=seed)
    return folder


def _tiny(**changes) -> TrainConfig:
    return TrainConfig(width=2, lr=1e-3, batch_size=4, epochs=3, patience=2, lambda_rec=0.1).replace(**changes)


def test_pooled_packs_read_every_district_tile_once_in_the_asked_order(packs):
    paths = sorted(packs.glob("*.h5"))
    with PooledPacks(paths) as pooled:
        assert pooled.num_samples("train") == sum(c[0] for c in COUNTS.values())
        singles = [DistrictPack(p) for p in paths]
        expected = [(pack, i) for pack in singles for i in range(pack.num_samples("val"))]
        order = np.random.default_rng(0).permutation(len(expected))
        past, current, mask, ids = pooled.read("val", order)
        for row, index in enumerate(order):
            pack, local = expected[index]
            p, c, m, (tile_id,) = pack.read("val", [local])
            np.testing.assert_array_equal(past[row], p[0])
            np.testing.assert_array_equal(current[row], c[0])
            np.testing.assert_array_equal(mask[row], m[0])
            assert ids[row] == f"{pack.district}/{tile_id}"
        seen = [tile for batch in pooled.batches("train", 4, shuffle=True, seed=3) for tile in batch.ids]
        assert sorted(seen) == sorted(f"{p.district}/{t}" for p in singles for t in p.ids("train"))
        for pack in singles:
            pack.close()


def test_fit_records_steps_and_why_it_stopped(packs):
    config = _tiny(epochs=2, patience=5)
    model = build_model(config)
    with DistrictPack(packs / "Gangseo-gu.h5") as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=config.epochs)
    assert (result.stop, result.epochs_run, result.steps) == ("cap", 2, 2 * 2)   # 7 tiles, batch 4: 2 steps
    config = _tiny(epochs=50, patience=1, lr=0.3)   # a far too large lr: validation loss rises soon
    model = build_model(config)
    with DistrictPack(packs / "Gangseo-gu.h5") as pack:
        result = fit(model, build_optimizer(model, config), pack, config, epochs=config.epochs)
    assert result.stop == "early-stop" and result.epochs_run < 50 and result.stop_epoch == result.epochs_run


def test_personalised_keeps_the_global_weights_when_fine_tuning_never_helps(packs, tmp_path):
    """With validate_start the global model is epoch 0: a diverging fine-tune gives it back unchanged."""
    config = _tiny()
    global_weights = {k: np.array(v) for k, v in build_model(config.replace(seed=9)).state_dict().items()}
    row = personalise_district(global_weights, packs / "Nowon-gu.h5", tmp_path, config.replace(lr=0.3, patience=1))
    assert row["best_epoch"] == 0 and row["stop"] == "early-stop" and row["steps"] == row["epochs_run"] * 1
    saved = load_checkpoint(tmp_path / "Nowon-gu" / "best.h5").model_state
    for name, value in global_weights.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    helped = personalise_district(global_weights, packs / "Nowon-gu.h5", tmp_path / "ok", config.replace(lr=1e-3))
    assert helped["epochs_run"] >= 1 and helped["test_tiles"] == 4 and helped["test_pixels"] == 4 * 16 * 16


def test_centralised_trains_one_model_on_the_pooled_splits(packs, tmp_path):
    config = _tiny(epochs=2, patience=5)
    summary, rows = train_central(sorted(packs.glob("*.h5")), tmp_path, config)
    pooled_train = sum(c[0] for c in COUNTS.values())
    assert summary["train_samples"] == pooled_train and summary["stop"] == "cap"
    assert summary["steps"] == 2 * -(-pooled_train // 4)
    assert sorted(r["district"] for r in rows) == sorted(COUNTS)
    assert all(r["test_tiles"] == 4 and r["test_change_pixels"] == r["tp"] + r["fn"] for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_run"] == 2
    assert load_checkpoint(tmp_path / "best.h5").config["district"] == "pooled"


def test_train_central_and_personalise_commands(packs, tmp_path):
    runner = CliRunner()
    tiny = ["--width", "2", "--epochs", "2", "--batch-size", "4", "--quiet"]
    result = runner.invoke(cli, ["train-central", "--data", str(packs), "--out", str(tmp_path / "central"), *tiny])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "central" / "central.csv").open()))
    assert len(rows) == 3 and "stopped by cap" in result.output
    result = runner.invoke(cli, ["personalise", "--model", str(tmp_path / "central" / "best.h5"), "--data",
                                 str(packs), "--out", str(tmp_path / "pers"), "--epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "pers" / "personalised.csv").open()))
    assert [r["district"] for r in rows] == ["Nowon-gu", "Jung-gu", "Gangseo-gu"] or len(rows) == 3
    assert {r["stop"] for r in rows} <= {"cap", "early-stop"}
    wrong = runner.invoke(cli, ["personalise", "--model", str(tmp_path / "central" / "best.h5"), "--data",
                                str(packs), "--out", str(tmp_path / "p2"), "--width", "4"])
    assert wrong.exit_code == 1 and "the model in" in wrong.output and "has width 2" in wrong.output
    folder = runner.invoke(cli, ["train-central", "--data", str(packs / "Jung-gu.h5"), "--out", str(tmp_path / "x")])
    assert folder.exit_code == 1 and "expected the folder of district packs" in folder.output
