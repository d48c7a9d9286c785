"""Checkpoint roundtrip and the errors a corrupt or mismatched checkpoint gives."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from nfed.common.errors import CheckpointError
from nfed.model.checkpoint import check_state_matches, load_checkpoint, save_checkpoint


def _state(width: int) -> dict:
    rng = np.random.default_rng(0)
    return {"encoder.e1.conv1.weight": rng.standard_normal((width, 3, 3, 3)).astype(np.float32),
            "encoder.e1.bn1.running_var": np.ones(width, np.float32)}


def test_roundtrip_keeps_every_part(tmp_path):
    state = _state(4)
    optimizer = {"step": np.array(7, np.int64), "exp_avg.encoder.e1.conv1.weight": np.full((4, 3, 3, 3), 0.5)}
    extra = {"server.momentum.encoder.e1.conv1.weight": np.arange(3.0)}
    path = save_checkpoint(tmp_path / "run" / "best.h5", state, optimizer_state=optimizer,
                           config={"width": 4, "tile": 64}, metrics={"f1": 0.5}, round=3, extra=extra)
    ckpt = load_checkpoint(path)
    assert set(ckpt.model_state) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(ckpt.model_state[name], value)
        assert ckpt.model_state[name].dtype == value.dtype
    assert int(ckpt.optimizer_state["step"]) == 7 and ckpt.optimizer_state["step"].dtype == np.int64
    np.testing.assert_array_equal(ckpt.extra["server.momentum.encoder.e1.conv1.weight"], np.arange(3.0))
    assert ckpt.config == {"width": 4, "tile": 64} and ckpt.metrics == {"f1": 0.5} and ckpt.round == 3
    assert not list(path.parent.glob(".*tmp"))          # atomic write left no temporary file


def test_optional_parts_default_to_empty(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "w.h5", _state(2)))
    assert ckpt.optimizer_state is None and ckpt.round is None and ckpt.extra == {} and ckpt.config == {}


def test_truncated_file_gives_one_line_error_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "best.h5", _state(8), optimizer_state={"step": np.array(1)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="best.h5.*corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an nfed checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.h5"):
        load_checkpoint(text)


def test_mismatch_names_shapes_missing_and_unexpected(tmp_path):
    expected = _state(8)
    wrong = _state(16)
    with pytest.raises(CheckpointError, match=r"encoder\.e1\.conv1\.weight \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        check_state_matches(expected, wrong, "ck.h5")
    partial = {"encoder.e1.conv1.weight": expected["encoder.e1.conv1.weight"], "head.bias": np.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 missing, e\.g\. encoder\.e1\.bn1\.running_var.*"
                                              r"1 unexpected, e\.g\. head\.bias"):
        check_state_matches(expected, partial, "ck.h5")
    check_state_matches(expected, _state(8), "ck.h5")   # matching state passes silently
