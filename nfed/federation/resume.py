"""What a resume checks before it continues a run (the settings, the data and the round history it started with)
and the server state global.h5 keeps for it."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from nfed.common.errors import CheckpointError, ConfigError
from nfed.runs.runfolder import rounds_digest

# Fields that change the arithmetic of the federation: a resumed run must use the values it started with.
RESUME_FIELDS = ("local_epochs", "fraction", "min_clients", "server_opt", "server_lr", "server_momentum",
                 "client_state", "seed", "eps", "patience_rounds", "warmup_rounds", "delta", "aggregator", "trim_beta",
                 "krum_f", "krum_m", "clip_factor", "max_sample_share", "dp_clip", "dp_noise", "dp_delta",
                 "secure_aggregation", "secagg_range", "simulate_attack", "attackers", "prox_mu",
                 "norm_policy", "compress", "broadcast", "hold_out")


def check_settings(saved_config: Mapping, fed_config, train_config, path: Path) -> None:
    """The federation and training settings must be those in the checkpoint (ConfigError listing changes)."""
    saved = saved_config.get("federation", {})
    changed = [f"{k} {saved.get(k)!r} -> {getattr(fed_config, k)!r}" for k in RESUME_FIELDS
               if k in saved and _normalise(saved[k]) != _normalise(getattr(fed_config, k))]
    saved_train = saved_config.get("train", {})
    changed += [f"{k} {saved_train[k]!r} -> {v!r}" for k, v in train_config.to_dict().items()
                if k in saved_train and k != "device" and saved_train[k] != v]
    if changed:
        raise ConfigError(f"{path}: --resume with different settings than the run was started with: "
                          f"{'; '.join(changed)}")


def check_data(saved, current: Mapping[str, str | None], path: Path) -> None:
    """The districts and pack contents must be those the run started with (when it recorded them)."""
    if not isinstance(saved, dict):
        return
    problems = [f"{d} is new" for d in current if d not in saved]
    problems += [f"{d} is missing" for d in saved if d not in current]
    problems += [f"{d}'s pack has changed" for d in current
                 if d in saved and current[d] is not None and saved[d] is not None and current[d] != saved[d]]
    if problems:
        more = f" ({len(problems)} in all)" if len(problems) > 5 else ""
        raise ConfigError(f"{path}: --resume with other data than the run was started with: "
                          f"{'; '.join(problems[:5])}{more}")


def check_history(checkpoint, records: list[dict], rounds_path: Path, path: Path) -> None:
    """rounds.jsonl must hold exactly rounds 1..N of the checkpoint's round N, unchanged."""
    done = int(checkpoint.round or 0)
    numbers = [r.get("round") for r in records]
    digest = checkpoint.metrics.get("rounds_digest")
    if numbers != list(range(1, done + 1)) or (digest is not None and rounds_digest(records) != digest):
        raise CheckpointError(f"{rounds_path}: the round history does not match {path} "
                              f"(rounds {_span(numbers)} on file, the checkpoint is after round {done}): it "
                              "was deleted or edited; restore it, or start afresh with --overwrite")


def server_state(server, stop, seed: int) -> dict:
    """The server optimiser's and the stop rules' state as global.h5's extra arrays."""
    extra = {f"server.{k}": v for k, v in server.state_dict().items()}
    extra.update({f"stop.{k}": v for k, v in stop.state_dict().items()})
    extra["rng.seed"] = np.asarray(seed, dtype=np.int64)
    return extra


def restore_server_state(extra: Mapping, server, stop) -> None:
    """Load `server_state`'s arrays back into the server optimiser and the stop rules."""
    server.load_state_dict({k[len("server."):]: v for k, v in extra.items() if k.startswith("server.")})
    stop.load_state_dict({k[len("stop."):]: v for k, v in extra.items() if k.startswith("stop.")})


def _span(numbers: list) -> str:
    """[1, 2, 3] -> '1-3', [] -> 'none', gaps or junk listed as they are."""
    if not numbers:
        return "none"
    if all(isinstance(n, int) for n in numbers) and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value
