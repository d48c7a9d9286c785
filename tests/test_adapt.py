"""AdaBN (`nfed adapt`): BatchNorm statistics re-estimated on a district's tiles, against statistics of the
layers' inputs captured independently (and a NumPy convolution for the first layer); nothing else changes; a
district with shifted imagery gets its own statistics back; the command's outputs and one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_hardening import one_line_error

from nfed.cli import cli
from nfed.core import functions as F
from nfed.core import nn
from nfed.core.autograd import no_grad
from nfed.data.packwriter import write_pack
from nfed.data.reader import DistrictPack
from nfed.data.synthscene import generate_tile
from nfed.data.synthstyle import district_style
from nfed.model.checkpoint import load_checkpoint, save_checkpoint
from nfed.model.wnet import ConvBlock
from nfed.training.adapt import adapt_batchnorm
from nfed.training.trainer import TrainConfig, build_model

TILE = 32


def _pack(path: Path, district: str, scale: int = 1, n: int = 7) -> Path:
    """A pack of n even-valued synthetic tiles per split, divided by `scale` (exact: a darker district)."""
    style, rng = district_style("Jung-gu", 0), np.random.default_rng(0)
    splits = {}
    for split in ("train", "val", "test"):
        tiles = [generate_tile(style, rng, TILE) for _ in range(n)]
        past, current = (np.stack([getattr(t, k) for t in tiles]) & 0xFE for k in ("past", "current"))
        splits[split] = (past // scale, current // scale, np.stack([t.mask() for t in tiles]),
                         [f"{split}_{i}" for i in range(n)])
    return write_pack(path, district, splits, source="test")


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return _pack(root / "Jung-gu.h5", "Jung-gu"), _pack(root / "Dobong-gu.h5", "Dobong-gu", scale=2)


def _model(lambda_rec: float = 0.1):
    return build_model(TrainConfig(width=2, lambda_rec=lambda_rec))


def _bn_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _captured_statistics(model, pack_path, batch_size):
    """Each BatchNorm's input over the split, captured at the convolution before it (training-mode passes with
    the same batches): mean and unbiased variance per channel in float64."""
    seen: dict[int, list] = {}
    for block in (m for m in model.modules() if isinstance(m, ConvBlock)):
        def capturing(x, conv, bn):
            seen.setdefault(id(bn), []).append(
                np.array(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding).data, dtype=np.float64))
            return ConvBlock._unit(x, conv, bn)
        block._unit = capturing
    model.train()
    with no_grad(), DistrictPack(pack_path) as pack:
        for batch in pack.batches("train", batch_size, shuffle=False):
            model(batch.past, batch.current)
    stats = {}
    for name, m in _bn_layers(model):
        if id(m) not in seen:   # a layer the forward pass does not reach
            continue
        values = np.concatenate(seen[id(m)]).transpose(1, 0, 2, 3).reshape(m.num_features, -1)
        stats[name] = values.mean(axis=1), values.var(axis=1, ddof=1)
    return stats


def _first_layer_statistics(model, pack_path):
    """encoder.e1.bn1's input from a NumPy 3x3 convolution of both dates of every training tile."""
    conv = model.encoder.e1.conv1
    with DistrictPack(pack_path) as pack:
        batch = next(iter(pack.batches("train", 1000, shuffle=False)))
    x = np.concatenate([batch.past, batch.current]).astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3))
    z = np.einsum("nchwij,ocij->onhw", windows, conv.weight.data.astype(np.float64))
    z += conv.bias.data.astype(np.float64)[:, None, None, None]
    values = z.reshape(z.shape[0], -1)
    return values.mean(axis=1), values.var(axis=1, ddof=1)


@pytest.mark.parametrize("lambda_rec", [0.1, 0.0])
def test_statistics_are_those_of_each_layers_input_and_nothing_else_changes(packs, lambda_rec):
    """Batches of 3 over 7 tiles (uneven): pooled exactly; with lambda_rec 0 the decoder (never run) keeps its own."""
    model = _model(lambda_rec)
    before = model.state_dict()
    with DistrictPack(packs[0]) as pack:
        assert adapt_batchnorm(model, pack, "train", batch_size=3) == 7
    reference = _captured_statistics(_model(lambda_rec), packs[0], batch_size=3)
    after = model.state_dict()
    for name, m in _bn_layers(model):
        if lambda_rec == 0 and name.startswith("decoder."):
            np.testing.assert_array_equal(after[f"{name}.running_var"], before[f"{name}.running_var"])
            continue
        mean, var = reference[name]
        np.testing.assert_allclose(m.running_mean, mean, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(m.running_var, var, rtol=1e-4, atol=1e-7, err_msg=name)
    mean, var = _first_layer_statistics(model, packs[0])
    np.testing.assert_allclose(after["encoder.e1.bn1.running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["encoder.e1.bn1.running_var"], var, rtol=1e-5, atol=1e-7)
    for name, value in before.items():
        if "running_" not in name:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert model.training   # the mode it had


def test_a_district_with_shifted_imagery_gets_its_own_statistics_back(packs):
    """Dobong-gu's pixels are Jung-gu's halved: adapted on each district the model computes the same change
    logits on each (the first normalisation absorbs the shift); adapted on Jung-gu it is wrong on Dobong-gu."""
    adapted = []
    for path in packs:
        model = _model()
        with DistrictPack(path) as pack:
            adapt_batchnorm(model, pack, "train", batch_size=7)
            batch = next(iter(pack.batches("test", 7, shuffle=False)))
        adapted.append((model, batch))
    (jung, jung_tiles), (dobong, dobong_tiles) = adapted
    own = jung.change_logits(jung_tiles.past, jung_tiles.current)
    recovered = dobong.change_logits(dobong_tiles.past, dobong_tiles.current)
    unadapted = jung.change_logits(dobong_tiles.past, dobong_tiles.current)
    gap = np.abs(unadapted - own).max()
    assert np.abs(recovered - own).max() < 0.05 * gap
    first = "encoder.e1.bn1.running_var"
    np.testing.assert_allclose(dobong.state_dict()[first], jung.state_dict()[first] / 4, rtol=1e-3)


def _checkpoint(tmp_path) -> Path:
    config = TrainConfig(width=2)
    return save_checkpoint(tmp_path / "model.h5", build_model(config).state_dict(),
                           config={**config.to_dict(), "tile": TILE, "district": "Jung-gu"})


def test_adapt_command_writes_a_checkpoint_evaluate_accepts(packs, tmp_path):
    source = _checkpoint(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["adapt", "--model", str(source), "--data", str(packs[1]),
                                 "--out", str(tmp_path / "adapted.h5"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "Dobong-gu's 7 train tile(s)" in result.output
    saved = load_checkpoint(tmp_path / "adapted.h5")
    assert saved.config["adapted_on"] == {"district": "Dobong-gu", "split": "train", "tiles": 7, "batch_size": 4}
    assert saved.config["adapted_from"] == str(source.resolve()) and saved.config["train"]["tile"] == TILE
    original = load_checkpoint(source).model_state
    assert not np.array_equal(saved.model_state["encoder.e1.bn1.running_mean"],
                              original["encoder.e1.bn1.running_mean"])
    evaluated = runner.invoke(cli, ["evaluate", "--model", str(tmp_path / "adapted.h5"), "--data", str(packs[1])])
    assert evaluated.exit_code == 0 and "Dobong-gu" in evaluated.output, evaluated.output


def test_adapt_command_errors_are_one_line(packs, tmp_path):
    source = _checkpoint(tmp_path)

    def adapt(*args):
        return CliRunner().invoke(cli, ["adapt", *map(str, args)])

    one_line_error(adapt("--model", source, "--data", tmp_path / "none.h5", "--out", tmp_path / "a.h5"), "none.h5")
    (tmp_path / "bad.h5").write_bytes(b"not a checkpoint")
    one_line_error(adapt("--model", tmp_path / "bad.h5", "--data", packs[0], "--out", tmp_path / "a.h5"), "bad.h5")
    one_line_error(adapt("--model", source, "--data", packs[0], "--out", source), "--model")
    one_line_error(adapt("--model", source, "--data", packs[0], "--out", packs[0]), "--data")
    assert load_checkpoint(source).config["district"] == "Jung-gu"   # untouched
    assert not (tmp_path / "a.h5").exists()
