"""model-info, train-local, evaluate and predict end to end through the CLI on synthetic packs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_training import synthetic_pack
from test_wnet import closed_form_parameters

from nfed.cli import cli
from nfed.model.checkpoint import load_checkpoint

TINY = ["--width", "2", "--epochs", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert message.startswith("Error:") and "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("packs")
    synthetic_pack(folder / "Jung-gu.h5", "Jung-gu", counts=(8, 4, 4), tile=32, seed=1)
    synthetic_pack(folder / "Nowon-gu.h5", "Nowon-gu", counts=(6, 2, 3), tile=32, seed=2)
    return folder


@pytest.fixture(scope="module")
def trained(packs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    result = invoke("train-local", "--data", packs, "--all", "--out", run, *TINY)
    assert result.exit_code == 0, result.output
    return run


def test_model_info_study_size_json():
    result = invoke("model-info", "--width", "64", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["weighted_layers"] == 46 == len(info["layers"])
    assert info["parameters"] == closed_form_parameters(64, 2) == 67_317_448
    assert info["layers"][0] == {"name": "encoder.e1.conv1", "kind": "conv", "in": 3, "out": 64, "kernel": "3x3",
                                 "parameters": 3 * 64 * 9 + 64}


def test_model_info_table():
    result = invoke("model-info", "--width", "4", "--classes", "5")
    assert result.exit_code == 0
    assert "weighted_layers: 46" in result.output
    assert f"parameters: {closed_form_parameters(4, 5):,}" in result.output
    assert "decoder.head" in result.output and "deconv" in result.output


def test_train_local_all_writes_checkpoints_metrics_logs_and_csv(trained, packs):
    rows = list(csv.DictReader((trained / "local.csv").open()))
    assert [r["district"] for r in rows] == ["Nowon-gu", "Jung-gu"]        # the study's district order
    assert [int(r["samples"]) for r in rows] == [11, 16]                  # train + val + test tiles
    assert list(rows[0]) == ["district", "samples", "precision", "recall", "f1", "iou", "train_samples", "test_tiles",
                             "test_pixels", "test_change_pixels", "epochs_run", "steps", "stop", "best_epoch"]
    for row in rows:   # --epochs 2 with patience 3: the cap ended every run, and the table says so
        assert row["stop"] == "cap" and row["epochs_run"] == "2"
        assert int(row["steps"]) == 2 * -(-int(row["train_samples"]) // 4)
        assert int(row["test_pixels"]) == int(row["test_tiles"]) * 32 * 32
    for district in ("Jung-gu", "Nowon-gu"):
        metrics = json.loads((trained / district / "metrics.json").read_text())
        for key in ("precision", "recall", "f1", "iou", "oa", "kappa", "epochs_run", "stop_epoch",
                    "wall_time_s", "images_per_s"):
            assert key in metrics
        assert metrics["epochs_run"] == 2 and metrics["config"]["width"] == 2
        lines = (trained / district / "epochs.jsonl").read_text().splitlines()
        assert len(lines) == 2
        ckpt = load_checkpoint(trained / district / "best.h5")
        assert ckpt.config["width"] == 2 and ckpt.config["tile"] == 32 and ckpt.config["district"] == district
        assert "encoder.e1.conv1.weight" in ckpt.model_state
        assert "exp_avg.encoder.e1.conv1.weight" in ckpt.optimizer_state
        assert ckpt.metrics["f1"] == metrics["f1"]
    assert not list(trained.rglob(".*.tmp"))


def test_train_local_single_pack_and_option_overrides(packs, tmp_path):
    result = invoke("train-local", "--data", packs / "Jung-gu.h5", "--out", tmp_path, "--width", "2",
                    "--epochs", "1", "--lambda-rec", "0", "--seed", "3", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Jung-gu: f1" in result.output
    config = load_checkpoint(tmp_path / "Jung-gu" / "best.h5").config
    assert (config["lambda_rec"], config["seed"], config["epochs"]) == (0.0, 3, 1)
    assert not (tmp_path / "local.csv").exists()


def test_train_local_bad_inputs(packs, tmp_path):
    _one_line_error(invoke("train-local", "--data", packs, "--out", tmp_path, "--quiet"), "--all")
    _one_line_error(invoke("train-local", "--data", tmp_path / "none.h5", "--out", tmp_path), "none.h5")
    _one_line_error(invoke("train-local", "--data", packs / "Jung-gu.h5", "--out", tmp_path, "--lr", "-1"), "lr")


def test_evaluate_pools_per_district_and_overall(trained, packs):
    result = invoke("evaluate", "--model", trained / "Jung-gu" / "best.h5", "--data", packs, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    districts = {d["district"]: d for d in report["districts"]}
    assert set(districts) == {"Jung-gu", "Nowon-gu"} and report["split"] == "test"
    overall = report["overall"]
    for key in ("tp", "fp", "fn", "tn", "samples"):
        assert overall[key] == sum(d[key] for d in districts.values())
    assert overall["tp"] + overall["fp"] + overall["fn"] + overall["tn"] == 7 * 32 * 32
    own = json.loads((trained / "Jung-gu" / "metrics.json").read_text())
    assert districts["Jung-gu"]["f1"] == pytest.approx(own["f1"])          # same weights, same split
    table = invoke("evaluate", "--model", trained / "Jung-gu" / "best.h5", "--data", packs / "Jung-gu.h5",
                   "--split", "val")
    assert table.exit_code == 0 and "overall (pooled)" in table.output and "Jung-gu" in table.output


def test_evaluate_errors(trained, packs, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes((trained / "Jung-gu" / "best.h5").read_bytes()[:3000])
    _one_line_error(invoke("evaluate", "--model", broken, "--data", packs), "broken.h5")
    _one_line_error(invoke("evaluate", "--model", tmp_path / "absent.h5", "--data", packs), "not found")


def _write_rgb(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_predict_any_size_pair_and_pair_folder(trained, tmp_path):
    rng = np.random.default_rng(0)
    past = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)             # not a multiple of the tile (32)
    current = past.copy()
    current[10:30, 20:45] = 255
    a = _write_rgb(tmp_path / "pairs" / "A" / "x1.png", past)
    b = _write_rgb(tmp_path / "pairs" / "B" / "x1.png", current)
    _write_rgb(tmp_path / "pairs" / "A" / "x2.png", past[:16, :16])
    _write_rgb(tmp_path / "pairs" / "B" / "x2.png", current[:16, :16])
    model = trained / "Jung-gu" / "best.h5"
    result = invoke("predict", "--model", model, "--past", a, "--current", b, "--out", tmp_path / "m.png")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (50, 70) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}

    result = invoke("predict", "--model", model, "--pairs", tmp_path / "pairs", "--out", tmp_path / "masks",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / "x1.png")), mask)   # same pair, same mask
    assert np.asarray(Image.open(tmp_path / "masks" / "x2.png")).shape == (16, 16)


def test_predict_tiles_agree_with_the_model_on_whole_tiles(trained, packs):
    from nfed.data.reader import DistrictPack
    from nfed.training.predict import predict_change
    from nfed.training.trainer import model_from_checkpoint

    model, _ = model_from_checkpoint(trained / "Jung-gu" / "best.h5")
    with DistrictPack(packs / "Jung-gu.h5") as pack:
        past, current, _, _ = pack.read("test", [0, 1])
        batch = next(pack.batches("test", 2, shuffle=False))
    # a 32x64 image made of two tiles side by side is predicted tile by tile
    wide = predict_change(model, np.concatenate(list(past), axis=1), np.concatenate(list(current), axis=1), 32)
    direct = model.predict(batch.past, batch.current)
    np.testing.assert_array_equal(wide, np.concatenate(list(direct), axis=1))


def test_predict_errors(trained, tmp_path):
    model = trained / "Jung-gu" / "best.h5"
    a = _write_rgb(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    b = _write_rgb(tmp_path / "b.png", np.zeros((40, 39, 3), np.uint8))
    _one_line_error(invoke("predict", "--model", model, "--past", a, "--current", b, "--out", tmp_path / "m.png"),
                    "a.png", "b.png", "same size")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    _one_line_error(invoke("predict", "--model", model, "--past", a, "--current", junk, "--out", tmp_path / "m.png"),
                    "junk.png")
    _one_line_error(invoke("predict", "--model", model, "--past", a, "--out", tmp_path / "m.png"), "--pairs")
    _one_line_error(invoke("predict", "--model", model, "--pairs", tmp_path, "--out", tmp_path / "o"), "A/")
    assert not (tmp_path / "m.png").exists()


def test_checkpoint_of_another_width_is_rejected_with_the_mismatch(trained, tmp_path):
    from nfed.common.errors import CheckpointError
    from nfed.model.checkpoint import save_checkpoint
    from nfed.training.trainer import TrainConfig, build_model, load_weights

    ckpt = load_checkpoint(trained / "Jung-gu" / "best.h5")
    wider = build_model(TrainConfig(width=4))
    with pytest.raises(CheckpointError, match=r"best\.h5.*shape mismatch.*encoder\.e1\.conv1\.weight \(2, 3, 3, 3\) "
                                              r"vs model \(4, 3, 3, 3\)"):
        load_weights(wider, ckpt, trained / "Jung-gu" / "best.h5")
    # a checkpoint whose config lies about its width names the mismatch too
    lying = save_checkpoint(tmp_path / "lying.h5", ckpt.model_state, config={**ckpt.config, "width": 4})
    _one_line_error(invoke("evaluate", "--model", lying, "--data", tmp_path), "lying.h5", "shape mismatch")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bench_step_reports_both_sides_as_json(mode):
    extra = ["--eval", "--threads", "1"] if mode == "eval" else []
    result = invoke("bench", "step", "--device", "cpu", "--width", "1", "--tile", "32", "--batch", "1",
                    "--repeat", "1", "--warmup", "0", "--json", "--op-profile", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["mode"] == mode and report["threads"] == (1 if mode == "eval" else None)
    assert report["nfed_img_per_s"] > 0 and report["nfed_peak_rss_mb"] > 0 and report["nfed_blas"]
    profile = {name: share for name, _, share in report["nfed_op_profile"]}
    assert "ConvBNReLU forward" in profile and ("Adam step" in profile) == (mode == "train")
    assert sum(profile.values()) == pytest.approx(1.0)
    try:
        import torch  # noqa: F401
    except ImportError:
        assert report["ratio"] is None and "PyTorch" in report["reference_note"]
    else:
        assert report["reference_img_per_s"] > 0 and report["reference_peak_rss_mb"] > 0
        assert (", 1 threads" in report["reference_version"]) == (mode == "eval")
        assert report["ratio"] == pytest.approx(report["nfed_img_per_s"] / report["reference_img_per_s"])
    _one_line_error(invoke("bench", "step", "--tile", "40"), "multiple of 16")
    _one_line_error(invoke("bench", "step", "--threads", "0"), "--threads")
