"""Checkpoints: model weights, optimiser state, config, metrics and round in one HDF5 file; never pickled.

Layout (format "nfed-checkpoint", version 1):
- group `model/`: one dataset per state name (parameters and BatchNorm running statistics), named exactly
  like `Module.state_dict()` keys, e.g. `encoder.e1.conv1.weight` (PyTorch layouts, so weights map 1:1);
- group `optimizer/`: the optimiser's flat state (`step`, `exp_avg.<name>`, `exp_avg_sq.<name>`, ...);
- group `extra/`: any further named arrays (e.g. the federation server's optimiser state);
- file attributes: `format`, `format_version`, `nfed_version`, `config` and `metrics` (JSON text), `round`.
Arrays are stored from host memory and loaded as NumPy, so a checkpoint written on a GPU loads on a CPU and
vice versa (the model moves them to its device). Files are written atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from nfed import __version__
from nfed.common import backend, strict_json
from nfed.common.errors import CheckpointError
from nfed.common.h5check import check_h5_file
from nfed.common.h5write import create_h5, raise_if_failed

FORMAT = "nfed-checkpoint"
FORMAT_VERSION = 1
_GROUPS = ("model", "optimizer", "extra")


@dataclass
class Checkpoint:
    """What a checkpoint file holds (arrays as NumPy)."""

    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray] | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    round: int | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, model_state: Mapping, *, optimizer_state: Mapping | None = None,
                    config: dict | None = None, metrics: dict | None = None, round: int | None = None,
                    extra: Mapping | None = None) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written file under `path`)."""
    path = Path(path)
    with create_h5(path) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["nfed_version"] = __version__
        f.attrs["config"] = strict_json.dumps(config or {}, sort_keys=True)
        f.attrs["metrics"] = strict_json.dumps(metrics or {}, sort_keys=True)
        if round is not None:
            f.attrs["round"] = int(round)
        for group_name, arrays in zip(_GROUPS, (model_state, optimizer_state, extra)):
            if arrays is None:
                continue
            group = f.create_group(group_name)
            for name, value in arrays.items():
                if "/" in name:
                    raise ValueError(f"state name {name!r} must not contain '/'")
                group.create_dataset(name, data=backend.to_numpy(value))
                raise_if_failed(f, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; CheckpointError (one line naming the file) when missing, corrupt, foreign, or holding
    weights that cannot be used (not floating point, NaN/inf, negative BatchNorm variances)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with h5py.File(path, "r") as f:
            check_h5_file(f, path, error=CheckpointError)
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an nfed checkpoint (format attribute missing or wrong)")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CheckpointError(f"{path}: checkpoint format version {version} is not supported "
                                      f"(this nfed reads version {FORMAT_VERSION})")
            if "model" not in f:
                raise CheckpointError(f"{path}: checkpoint has no model weights (group 'model' missing)")
            groups = {name: _read_group(f[name]) if name in f else None for name in _GROUPS}
            config = _read_json(f, "config", path)
            metrics = _read_json(f, "metrics", path)
            round_ = int(f.attrs["round"]) if "round" in f.attrs else None
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({_first_line(exc)})") from None
    problem = state_problem(groups["model"], "model") or state_problem(groups["optimizer"] or {}, "optimizer")
    if problem:
        raise CheckpointError(f"{path}: unusable checkpoint: {problem}")
    if round_ is not None and round_ < 0:
        raise CheckpointError(f"{path}: unusable checkpoint: round {round_} is negative")
    return Checkpoint(model_state=groups["model"], optimizer_state=groups["optimizer"], config=config,
                      metrics=metrics, round=round_, extra=groups["extra"] or {})


def state_problem(state: Mapping[str, np.ndarray], group: str) -> str | None:
    """Why a state dict of `group` ("model" or "optimizer") cannot be trusted, or None.

    Model entries must be floating point and finite, BatchNorm variances >= 0; optimizer entries numeric
    (the step count an integer) and finite.
    """
    for name, value in state.items():
        kinds = "f" if group == "model" else "fiu"
        if value.dtype.kind not in kinds:
            wanted = "floating point" if group == "model" else "numeric"
            return f"{group} entry {name} has dtype {value.dtype}, expected {wanted}"
        if value.dtype.kind == "f":
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                return f"{group} entry {name} holds {bad} NaN or infinite value(s) of {value.size}"
        if group == "model" and name.endswith("running_var") and value.size and float(value.min()) < 0:
            return f"{group} entry {name} holds negative variances (min {float(value.min()):.3g})"
    return None


def checkpoint_kind(checkpoint: Checkpoint) -> str:
    """What a checkpoint is, in words, from its config (for messages about the wrong kind of file)."""
    config = checkpoint.config
    if isinstance(config.get("federation"), dict):
        return f"the global model of a federated run (after round {checkpoint.round or 0})"
    if config.get("district"):
        return f"a train-local checkpoint of {config['district']}"
    return "a bare weights file without a training set-up (a worker's or client state file)"


def folder_message(path: Path) -> str:
    """The message for a run folder given where a checkpoint file is expected: which file inside to use."""
    if (path / "global.h5").is_file():
        return f"{path}: is a folder (a federated run); its checkpoint is {path / 'global.h5'}"
    local = sorted(path.glob("*/best.h5"))
    if (path / "best.h5").is_file():
        return f"{path}: is a folder; its checkpoint is {path / 'best.h5'}"
    if local:
        return (f"{path}: is a folder (a train-local run); give one district's checkpoint, e.g. {local[0]} "
                f"({len(local)} in all)")
    return f"{path}: is a folder, not a checkpoint file, and holds no global.h5 or */best.h5"


def check_state_matches(expected: Mapping, state: Mapping, source: str | os.PathLike) -> None:
    """Raise CheckpointError naming missing, unexpected and shape-mismatched names of `state` vs `expected`.

    `expected` is the model's own state dict; `source` names where `state` came from (file path).
    """
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    mismatched = [f"{n} {tuple(state[n].shape)} vs model {tuple(expected[n].shape)}"
                  for n in expected if n in state and tuple(state[n].shape) != tuple(expected[n].shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {', '.join(mismatched[:3])}")
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model: {'; '.join(problems)}")


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: np.asarray(dataset[()]) for name, dataset in group.items()}


def _read_json(f: h5py.File, key: str, path: Path) -> dict:
    text = f.attrs.get(key, "{}")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = strict_json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: checkpoint attribute '{key}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: checkpoint attribute '{key}' is not a JSON object")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
