"""nfed export: safetensors that the PyTorch twin loads strictly and runs to the same logits; ONNX that
onnxruntime runs to the same logits. Weights are a trained-like state (random BatchNorm statistics)."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from nfed.cli import cli
from nfed.model.checkpoint import save_checkpoint
from nfed.model.wnet import WNetCD

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (nfed[export])")

TILE = 32


def _model(classes: int) -> WNetCD:
    """W-Net-CD at width 4 whose BatchNorm statistics and affine terms are not the identity (as after training)."""
    model = WNetCD(width=4, classes=classes, lambda_rec=0.1, rng=np.random.default_rng(classes))
    rng = np.random.default_rng(7)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("running_mean") or name.endswith(".bias") and ".bn" in name:
            state[name] = rng.normal(0, 0.1, value.shape).astype(np.float32)
        elif name.endswith("running_var") or name.endswith(".weight") and ".bn" in name:
            state[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    model.load_state_dict(state)
    return model


def _inputs(n: int = 2, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return tuple(rng.random((n, 3, size, size), dtype=np.float32) for _ in range(2))


@pytest.fixture(params=[2, 5], ids=["2-class", "5-class"])
def exported(request, tmp_path):
    model = _model(request.param)
    checkpoint = save_checkpoint(tmp_path / "best.h5", model.state_dict(),
                                 config={"width": 4, "classes": request.param, "lambda_rec": 0.1, "tile": TILE})
    result = CliRunner().invoke(cli, ["export", "--model", str(checkpoint), "--format", "safetensors", "--onnx"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return model, tmp_path / "best.safetensors", tmp_path / "best.onnx"


def test_safetensors_hold_every_state_tensor_by_name_with_the_config(exported):
    from safetensors import safe_open

    model, path, _ = exported
    tensors = safetensors_numpy.load_file(str(path))
    state = model.state_dict()
    assert set(tensors) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value)
    with safe_open(str(path), "np") as handle:
        metadata = handle.metadata()
    assert (metadata["width"], metadata["classes"], metadata["tile"]) == ("4", str(model.classes), str(TILE))
    assert not path.read_bytes().startswith(b"\x80")                     # not a pickle


def test_pytorch_twin_loads_the_safetensors_strictly_and_gives_the_same_logits(exported):
    torch = pytest.importorskip("torch", reason="torch not installed (nfed[bench])")
    from safetensors.torch import load_file

    from nfed.benchmarks import torch_twin as twin
    model, path, _ = exported
    theirs = twin.WNetCD(4, model.classes, 0.1)
    theirs.load_state_dict(load_file(str(path)), strict=True)
    theirs.eval()
    past, current = _inputs()
    with torch.no_grad():
        expected = theirs.encode(torch.from_numpy(past), torch.from_numpy(current)).numpy()
    ours = model.change_logits(past, current)
    assert np.abs(ours - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_onnx_u_encoder_runs_in_onnxruntime_to_the_same_logits(exported):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    model, _, onnx_path = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n, size in ((2, 48), (1, 32)):                                    # dynamic batch and size
        past, current = _inputs(n, size)
        logits, probabilities = session.run(["logits", "probabilities"], {"past": past, "current": current})
        expected = model.change_logits(past, current)
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    meta = {p.key: p.value for p in __import__("onnx").load(str(onnx_path)).metadata_props}
    assert meta["classes"] == str(model.classes) and meta["tile"] == str(TILE)


def test_export_without_safetensors_is_one_line(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "best.h5", _model(2).state_dict(),
                                 config={"width": 4, "classes": 2, "lambda_rec": 0.1, "tile": TILE})
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    result = CliRunner().invoke(cli, ["export", "--model", str(checkpoint)])
    assert result.exit_code == 1 and "nfed[export]" in result.output and "Traceback" not in result.output


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "nope.h5")])
    assert result.exit_code == 1 and "nope.h5" in result.output and "Traceback" not in result.output
