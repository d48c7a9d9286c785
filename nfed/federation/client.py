"""A federation client: one district's local training for one round, and evaluation of global weights.

`train_round` is a plain function (global weights + the round's set-up + the district's pack path ->
weights, number of training samples, metrics) with no process or file assumptions beyond reading the pack,
so the in-process simulation, the worker subprocesses and the Flower client all call the same code.

The round set-up is a nfed.federation.round_setup.RoundSetup (a dict only on the wire).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from nfed.common.backend import to_numpy
from nfed.core.functions.parallel import num_workers
from nfed.federation import norm_policy
from nfed.federation.attacks import FlippedMasks
from nfed.federation.compression import compress_update, received
# DP_CLIP_KEY, PROX_MU_KEY and make_round_setup are re-exported where callers of earlier versions found them
from nfed.federation.round_setup import DP_CLIP_KEY, PROX_MU_KEY, RoundSetup, make_round_setup  # noqa: F401
from nfed.training.environment import RunEnvironment, default_environment


@dataclass
class ClientResult:
    """What a client sends back: its weights by name, its number of training samples, its metrics. With a
    compressed update (`update`: nfed.federation.compression's payload of the shared tensors' delta) `weights`
    holds only what stays with the district; `residual` is int8-ef's error feedback, kept as client state."""

    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict = field(default_factory=dict)
    optimizer_state: dict[str, np.ndarray] | None = None
    update: dict | None = None
    residual: dict[str, np.ndarray] | None = None
    bytes_up: int | None = None             # what the update weighed on the wire (set where it was received)


@dataclass
class ClientTask:
    """One client's job in one round."""

    district: str
    pack_path: Path
    setup: RoundSetup
    optimizer_state: dict | None = None
    env: RunEnvironment | None = None      # where the client runs (None: the CPU at the precision in force)
    local_state: dict | None = None        # the district's own BatchNorm tensors (--norm-policy fedbn / silobn)
    residual: dict | None = None           # int8-ef's error feedback of the district's last round

    def start_weights(self, global_weights: Mapping) -> Mapping:
        """What the client trains from: the global model with the district's own local tensors in place."""
        return norm_policy.merge(global_weights, self.local_state) if self.local_state else global_weights


@dataclass
class ClientOutcome:
    """How a client's round ended: ok (on time), late, or failed (crashed / unreadable result)."""

    district: str
    status: str
    seconds: float = 0.0
    simulated_seconds: float | None = None
    result: ClientResult | None = None
    reason: str = ""


# Entries of a round record that a client's metrics must not overwrite.
RESERVED_ENTRIES = ("status", "seconds", "simulated_seconds", "reason", "num_samples", "weight", "capped",
                    "attacker")
MAX_METRICS = 32


def clean_metrics(metrics) -> dict:
    """What of a client's metrics the server records: at most MAX_METRICS entries with short names and finite
    numbers or short strings as values; anything else (a malformed or hostile reply) is dropped."""
    if not isinstance(metrics, Mapping):
        return {}
    clean = {}
    for key, value in metrics.items():
        if len(clean) >= MAX_METRICS:
            break
        if not isinstance(key, str) or len(key) > 64 or key in RESERVED_ENTRIES:
            continue
        if isinstance(value, bool) or value is None:
            clean[key] = value
        elif isinstance(value, numbers.Integral):
            clean[key] = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            clean[key] = float(value)
        elif isinstance(value, str) and len(value) <= 200:
            clean[key] = value
    return clean


def _model_with(weights: Mapping, config, env: RunEnvironment):
    from nfed.training.trainer import build_model

    model = build_model(config, env.device)
    model.load_state_dict(dict(weights))
    return model


def host_state(model) -> dict[str, np.ndarray]:
    """The model's state dict copied to host memory (parameters and BatchNorm statistics)."""
    return {name: np.array(to_numpy(value)) for name, value in model.state_dict().items()}


def train_round(global_weights: Mapping[str, np.ndarray], setup: RoundSetup | Mapping, pack_path: str | Path, *,
                optimizer_state: Mapping[str, np.ndarray] | None = None,
                env: RunEnvironment | None = None, residual: Mapping[str, np.ndarray] | None = None) -> ClientResult:
    """Train `setup.local_epochs` epochs on the pack's train split, starting from the global weights (float16
    ones of a float16 broadcast are widened first), in the client's environment `env` (its device and precision;
    None: the CPU at the precision in force).

    The local optimiser starts fresh unless `optimizer_state` (kept by the client from its previous round)
    is given. Early stopping is off: every client does the same amount of work per round. Under `compress`
    the shared tensors leave as a compressed delta from the received weights (int8-ef adds `residual`, the
    error feedback of the client's previous round, and returns the new one).
    """
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import build_optimizer, fit

    started = time.perf_counter()
    env = env or default_environment()
    setup = RoundSetup.from_dict(setup)   # a dict (a set-up from the wire) is checked key by key
    config, policy = setup.config, setup.norm_policy
    global_weights = received(global_weights)
    model = _model_with(global_weights, config, env)
    optimizer = build_optimizer(model, config)
    if optimizer_state:
        optimizer.load_state_dict(dict(optimizer_state))
    # FedProx pulls the trainable weights (not the BatchNorm statistics) towards the global ones, held on the device
    proximal = (setup.prox_mu, {name: p.data.copy() for name, p in model.named_parameters()}) \
        if setup.prox_mu > 0 else None
    with env.active(), DistrictPack(pack_path) as pack:
        source = pack
        if setup.simulate_attack == "label-flip":   # a simulated attacker (nfed federate --simulate-attack)
            source = FlippedMasks(pack)
        result = fit(model, optimizer, source, config, epochs=setup.local_epochs, early_stopping=False,
                     progress=False, epoch_seed_offset=setup.epoch_seed_offset,
                     validate_last_only=True, proximal=proximal)
    last = result.history[-1] if result.history else {}
    metrics = {
        "train_loss": float(last.get("train_loss", result.train_loss)),
        "val_loss": _maybe_float(last.get("val_loss")),
        "val_f1": _maybe_float(last.get("val_f1")),
        "epochs": int(result.epochs_run),
        "steps": int(result.steps),
        "wall_time_s": time.perf_counter() - started,
        "device": str(env.device), "precision": env.precision, "cpu_threads": num_workers(),   # where it computed
    }
    keep = setup.keep_optimizer_state
    weights = host_state(model)
    if setup.dp_clip:   # DP-FedAvg: the shared update leaves the client clipped to this L2 norm
        from nfed.federation.privacy import clip_update

        shared, local = norm_policy.split(weights, policy)
        shared, _ = clip_update(shared, norm_policy.split(global_weights, policy)[0], setup.dp_clip)
        weights = norm_policy.merge(shared, local)
    update = new_residual = None
    if setup.compress != "none":   # the shared part leaves as a compressed delta; the local part stays
        shared, weights = norm_policy.split(weights, policy)
        update, new_residual = compress_update(shared, norm_policy.split(global_weights, policy)[0], setup.compress,
                                               residual)
    return ClientResult(weights=weights, num_samples=int(result.num_train_samples), metrics=metrics,
                        optimizer_state={k: np.array(to_numpy(v)) for k, v in optimizer.state_dict().items()}
                        if keep else None, update=update, residual=new_residual)


def evaluate_weights(weights: Mapping[str, np.ndarray], setup: RoundSetup | Mapping, pack_path: str | Path, *,
                     split: str = "val", env: RunEnvironment | None = None, local_state: Mapping | None = None,
                     adapt_on: str | None = None) -> dict:
    """Loss and change-class metrics of `weights` (with the district's own `local_state` in place) on one split
    of the pack (federated evaluation); `adapt_on`: a split whose tiles first re-estimate the BatchNorm statistics
    (AdaBN, nfed.training.adapt: a district that never trained).

    `samples` counts the evaluated tiles, `pack_samples` all tiles of the pack (local.csv's `samples`),
    `train_samples` its training tiles and `tile` its tile size (what the F1 rests on)."""
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import evaluate

    env = env or default_environment()
    config = RoundSetup.from_dict(setup).config
    model = _model_with(norm_policy.merge(weights, local_state), config, env)
    with env.active(), DistrictPack(pack_path) as pack:
        if adapt_on is not None:
            from nfed.training.adapt import adapt_batchnorm

            adapt_batchnorm(model, pack, adapt_on, config.batch_size)
        metrics = evaluate(model, pack, split=split, batch_size=config.batch_size)
        metrics["pack_samples"] = sum(int(pack.num_samples(s)) for s in ("train", "val", "test"))
        metrics["train_samples"] = int(pack.num_samples("train"))
        metrics["tile"] = int(pack.tile)
    return metrics


def _maybe_float(value):
    return None if value is None else float(value)
