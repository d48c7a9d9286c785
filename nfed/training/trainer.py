"""Training W-Net-CD on one district pack: the study's recipe (Adam, batch 8, early stopping) made seedable.

Used by `nfed train-local` and by the federation client (one call of `fit` per round). With the same
config and seed on CPU, training produces the same weights bit for bit: the model is initialised from
`default_rng(seed)` and every epoch's shuffle/augmentation seed is derived from (seed, offset, epoch).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from nfed.common import backend, strict_json
from nfed.common.atomic import LineLog
from nfed.common.errors import CheckpointError, ConfigError, TrainingError
from nfed.common.memory import gib, memory_limit_bytes
from nfed.common.progress import progress as progress_bar
from nfed.common.fields import check_declared, declared, from_fields, option
from nfed.common.validate import SEED, Limit
from nfed.core import optim
from nfed.core.autograd import no_grad
from nfed.core.metrics import ConfusionMatrix
from nfed.model.checkpoint import Checkpoint, check_state_matches, checkpoint_kind, load_checkpoint
from nfed.model.wnet import WNetCD, parameter_count

OPTIMIZERS = ("adam", "adamw", "sgd")
# Keys a checkpoint's config keeps beside TrainConfig's fields: the tile and district it was trained on, where
# it started (personalised), its run environment, and `device`, a TrainConfig field of earlier versions.
SAVED_KEYS = ("tile", "district", "personalised_from", "environment", "device")


@declared
@dataclass
class TrainConfig:
    """Everything that defines a training run (what the federation server sends to its clients). Each field is
    declared once; the commands' options are profile overrides (nfed.commands.options.TRAINING_OPTIONS)."""

    width: int = option(8, cli="--width", limit=Limit(1, 1024, integer=True), help="W-Net base width w")
    classes: int = option(2, cli="--classes", choices=(2, 5), help="2 (default) or 5 (change types)")
    lambda_rec: float = option(0.1, cli="--lambda-rec", limit=Limit(0, 1000),
                               help="weight of the U-Decoder's reconstruction loss (0 skips it)")
    lr: float = option(1e-4, cli="--lr", limit=Limit(0, 1, low_open=True),
                       help="learning rate of the optimiser (the profile's by default)")
    batch_size: int = option(8, cli="--batch-size", limit=Limit(1, 65536, integer=True),
                             help="tiles per optimiser step")
    epochs: int = option(50, cli="--epochs", limit=Limit(1, 100000, integer=True),
                         help="maximum epochs (profile's value by default)")
    patience: int = option(3, cli="--patience", limit=Limit(1, 100000, integer=True),
                           help="early-stopping patience in epochs")
    patience_steps: int = option(0, cli="--patience-steps", limit=Limit(0, 10_000_000, integer=True),
                                 help="early stopping also waits this many optimiser steps without improvement "
                                      "(demo: 20)")
    seed: int = option(0, cli="--seed", limit=SEED, help="seed of initialisation, shuffling and augmentation "
                                                         "(default 0)")
    augment: bool = option(True, cli="--no-augment", help="train without flips/rotations")
    optimizer: str = option("adam", choices=OPTIMIZERS)
    weight_decay: float = option(0.0, limit=Limit(0, 1))
    profile: str = option("custom", help="the profile it was made from (recorded in every checkpoint)")

    def __post_init__(self) -> None:
        check_declared(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "TrainConfig":
        """A config from its to_dict() (e.g. the server's round set-up); ConfigError naming unknown keys."""
        return from_fields(cls, values, "training config")

    @classmethod
    def from_saved(cls, values: Mapping) -> "TrainConfig":
        """A config as a file stores it (a checkpoint, a run folder): the keys stored beside the fields
        (SAVED_KEYS, e.g. `device` of files written before the run environment had its own entry) are set
        aside first; any other unknown key is still an error."""
        return cls.from_dict({k: v for k, v in values.items() if k not in SAVED_KEYS})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# TrainConfig overrides per profile. "paper" is the study's set-up (Table 2). "demo" is sized so `nfed demo`
# (four columns, each trained to convergence) re-runs on 2 CPU cores in about 15 minutes: a small width and a
# higher lr; its epoch cap is far enough that early stopping, not the cap, ends a run.
PROFILES: dict[str, dict] = {
    "paper": {"width": 64, "lr": 1e-4, "batch_size": 8, "epochs": 50, "patience": 3},
    "demo": {"width": 6, "lr": 1e-3, "batch_size": 8, "epochs": 400, "patience": 3, "patience_steps": 20},
}
# Tile size each profile is meant for (a property of the packs, not of TrainConfig): used by synth/pack.
PROFILE_TILES: dict[str, int] = {"paper": 256, "demo": 64}


def profile_config(name: str, **overrides) -> TrainConfig:
    """TrainConfig of a profile with `overrides` applied (None values leave the profile's value)."""
    if name not in PROFILES:
        raise ConfigError(f"profile '{name}': use one of {', '.join(PROFILES)}")
    return TrainConfig(**PROFILES[name], profile=name).replace(**overrides)


@dataclass
class FitResult:
    """What one `fit` call did. `best_state` is the state the model ends with (the best epoch's when
    early stopping is on); `stop_epoch` is the epoch at which early stopping fired (None if it did not);
    `stop` says why training ended: "early-stop" (patience ran out) or "cap" (the epoch maximum was
    reached first: the run may not have converged). `steps` counts optimiser steps."""

    best_state: dict
    history: list
    epochs_run: int
    stop_epoch: int | None
    best_val_loss: float
    train_loss: float
    wall_time_s: float
    images_per_s: float
    num_train_samples: int
    best_epoch: int = 0
    steps: int = 0
    stop: str = "cap"
    extra: dict = field(default_factory=dict)


def build_model(config: TrainConfig, device: str | None = "cpu") -> WNetCD:
    """A freshly initialised W-Net-CD (weights from default_rng(config.seed)) on `device` (None: $NFED_DEVICE).

    On a GPU the device also becomes the thread's current one, so that arrays the ops allocate (and the
    kernels they launch) land on the same GPU as the weights (`--gpus 0,1,2` gives clients different ones).
    """
    device = backend.parse_device(device)
    require_memory(config, device)
    device.use()
    model = WNetCD(width=config.width, classes=config.classes, lambda_rec=config.lambda_rec,
                   rng=np.random.default_rng(config.seed))
    return model.to(device)


def require_memory_for(width: int, classes: int, copies: int) -> None:
    """ConfigError when `copies` float32 copies of the parameters (weights; for training also the gradients
    and the optimiser's state) exceed the memory this process may use: refused before anything is allocated.
    A lower bound (activations come on top), so it refuses only what cannot fit."""
    count = parameter_count(width, classes)
    need = 4 * copies * count
    have = memory_limit_bytes()
    if have is not None and need > have:
        held = "weights, gradients and optimiser state" if copies > 1 else "weights"
        raise ConfigError(f"W-Net-CD at width {width} has {count / 1e9:.1f} G parameters: at least {gib(need)} for "
                         f"its {held}, more than the {gib(have)} of memory this machine allows; choose a smaller "
                         f"width")


def require_memory(config: TrainConfig, device=None) -> None:
    """ConfigError when this machine's memory cannot hold the config's model for training on `device` (on the
    CPU the gradients and the optimiser's state share the host's memory with the weights; on a GPU they live
    there)."""
    state = 1 if config.optimizer == "sgd" else 2   # SGD's momentum buffer; Adam's two moments
    require_memory_for(config.width, config.classes, 1 if backend.parse_device(device).is_gpu else 2 + state)


def build_optimizer(model: WNetCD, config: TrainConfig):
    """The config's optimiser over the model's named parameters (state keyed by parameter name)."""
    params = list(model.named_parameters())
    if config.optimizer == "adam":
        return optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def epoch_seed(seed: int, offset: int, epoch: int) -> int:
    """The shuffle/augmentation seed of one epoch (distinct per run seed, per round offset and per epoch)."""
    return int(np.random.SeedSequence([int(seed), int(offset), int(epoch)]).generate_state(1)[0])


def fit(model: WNetCD, optimizer, pack, config: TrainConfig, *, epochs: int, early_stopping: bool = True,
        progress: bool = False, log_path: str | os.PathLike | None = None, epoch_seed_offset: int = 0,
        validate_start: bool = False, validate_last_only: bool = False,
        proximal: tuple[float, Mapping] | None = None) -> FitResult:
    """Train on the pack's train split for up to `epochs` epochs, validating after each on its val split.

    Early stopping watches the validation loss (the training loss when the pack has no val tiles): after
    `config.patience` epochs without improvement (and at least `config.patience_steps` optimiser steps, so
    that a district whose epoch is one step is not stopped by three noisy steps) training stops and the best
    epoch's weights are restored. Training and validation run on the model's device.
    With `validate_start` the starting weights are validated first and count as epoch 0, so fine-tuning
    that never beats them gives them back (best_epoch 0). With `validate_last_only` (no early stopping: a
    federated client's round) only the last epoch is validated, since nothing reads the others. Each epoch
    appends one JSON line to `log_path` (when given) and, with `progress`, shows a bar and a summary line on
    stderr. `proximal` = (mu, reference arrays by parameter name) trains FedProx's objective
    loss + mu/2 ||w - reference||^2 (see add_proximal_gradient); the losses reported leave the term out.
    """
    if epochs < 1:
        raise ConfigError(f"epochs {epochs}: must be >= 1")
    n_train = pack.num_samples("train")
    if n_train == 0:
        raise ConfigError(f"{pack.path}: the pack has no training tiles")
    has_val = pack.num_samples("val") > 0
    device = _model_device(model)
    steps = -(-n_train // config.batch_size)
    log = _open_log(log_path)
    history: list[dict] = []
    best_loss, best_epoch, best_state, stale, best_step = float("inf"), 0, None, 0, 0
    stop_epoch = None
    train_seconds = 0.0
    step_count = 0
    start = time.perf_counter()
    if validate_start and has_val and early_stopping:
        best_loss = evaluate(model, pack, "val", config.batch_size, device=device)["loss"]
        best_state = model.state_dict()
    try:
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            total, seen = 0.0, 0
            batches = pack.batches("train", config.batch_size, shuffle=True, augment=config.augment,
                                   seed=epoch_seed(config.seed, epoch_seed_offset, epoch), device=device)
            label = f"{pack.district} epoch {epoch}/{epochs}"
            for batch in progress_bar(batches, label=label, length=steps, enabled=progress):
                optimizer.zero_grad()
                loss, _, _ = model.loss(batch.past, batch.current, batch.mask)
                value = float(loss.item())
                if not math.isfinite(value):
                    raise TrainingError(f"{pack.district}: training diverged (loss {value} at epoch {epoch}); "
                                        f"lower the learning rate (lr {config.lr:g})")
                loss.backward()
                if proximal is not None:
                    add_proximal_gradient(model, *proximal)
                optimizer.step()
                step_count += 1
                count = len(batch.ids)
                total += value * count
                seen += count
            train_seconds += time.perf_counter() - epoch_start
            train_loss = total / max(seen, 1)
            skipped = has_val and validate_last_only and not early_stopping and epoch < epochs
            val = evaluate(model, pack, "val", config.batch_size, device=device) if has_val and not skipped \
                else None
            val_loss = val["loss"] if val else (None if skipped else train_loss)
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_f1": val["f1"] if val else None, "seconds": time.perf_counter() - epoch_start}
            history.append(row)
            if log is not None:
                log.write(strict_json.dumps({"district": pack.district, **row}) + "\n")
            improved = val_loss is not None and val_loss < best_loss
            if improved:
                best_loss, best_epoch, stale, best_step = val_loss, epoch, 0, step_count
                if early_stopping:
                    best_state = model.state_dict()   # a copy
            else:
                stale += 1
            if progress:
                _print_epoch(pack.district, row, epochs, improved)
            if early_stopping and stale >= config.patience and step_count - best_step >= config.patience_steps:
                stop_epoch = epoch
                break
    finally:
        if log is not None:
            log.close()
    if early_stopping and best_state is not None:
        model.load_state_dict(best_state)
    final_state = best_state if early_stopping and best_state is not None else model.state_dict()
    images = n_train * len(history)
    return FitResult(best_state=final_state, history=history, epochs_run=len(history), stop_epoch=stop_epoch,
                     best_val_loss=best_loss, train_loss=history[-1]["train_loss"],
                     wall_time_s=time.perf_counter() - start,
                     images_per_s=images / train_seconds if train_seconds > 0 else 0.0,
                     num_train_samples=n_train, best_epoch=best_epoch, steps=step_count,
                     stop="early-stop" if stop_epoch is not None else "cap")


def add_proximal_gradient(model: WNetCD, mu: float, reference: Mapping) -> None:
    """Add mu * (w - reference) to every trainable parameter's gradient: the gradient of mu/2 ||w - reference||^2
    (FedProx's proximal term) without building it into the graph. BatchNorm statistics are not parameters."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            p.grad = p.grad + mu * (p.data - reference[name])


def evaluate(model: WNetCD, pack, split: str = "test", batch_size: int = 8, *, device=None,
             confusion: ConfusionMatrix | None = None) -> dict:
    """Loss and pooled change metrics of the model on one split (eval mode, no graph).

    The model's device is used unless `device` is given; pass `confusion` to also pool into it.
    """
    device = device if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix()
    total, ce_total, rec_total, seen = 0.0, 0.0, 0.0, 0
    try:
        with no_grad():
            for batch in pack.batches(split, batch_size, shuffle=False, augment=False, device=device):
                logits, reconstruction = model(batch.past, batch.current)
                loss, ce, rec = model.loss_of_outputs(logits, reconstruction, batch.past, batch.current,
                                                      batch.mask)
                count = len(batch.ids)
                total += float(loss.item()) * count
                ce_total += float(ce.item()) * count
                rec_total += float(rec.item()) * count
                seen += count
                data = logits.data
                matrix.update(backend.array_module(data).argmax(data, axis=1), batch.mask)
    finally:
        model.train(was_training)
    if confusion is not None:
        confusion.merge(matrix)
    denominator = max(seen, 1)
    return {"loss": total / denominator, "ce_loss": ce_total / denominator, "rec_loss": rec_total / denominator,
            "samples": seen, **matrix.metrics()}


def model_from_checkpoint(path: str | os.PathLike, device=None) -> tuple[WNetCD, Checkpoint]:
    """Rebuild the checkpoint's model (width, classes, lambda_rec from its config) with its weights."""
    checkpoint = load_checkpoint(path)
    values = checkpoint_train_config(checkpoint)
    missing = [key for key in ("width", "classes") if key not in values]
    if missing:
        raise CheckpointError(f"{path}: {checkpoint_kind(checkpoint)}: it does not record the model set-up "
                              f"({', '.join(missing)} missing), so its weights cannot be rebuilt")
    try:
        config = TrainConfig.from_saved(values)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({exc})") from None
    try:
        require_memory_for(config.width, config.classes, 1)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = WNetCD(width=config.width, classes=config.classes, lambda_rec=config.lambda_rec,
                   rng=np.random.default_rng(0))
    load_weights(model, checkpoint, path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, checkpoint


def checkpoint_train_config(checkpoint: Checkpoint) -> dict:
    """The training config a checkpoint was made with: top-level for train-local, under "train" for
    the federation's global checkpoints."""
    nested = checkpoint.config.get("train")
    return nested if isinstance(nested, dict) else checkpoint.config


def checkpoint_tile(checkpoint: Checkpoint, source: str | os.PathLike = "checkpoint") -> int:
    """The tile size the checkpoint's model was trained on; CheckpointError when it was not recorded
    (older federated checkpoints): guessing a tile would predict at the wrong scale without a word."""
    for config in (checkpoint.config, checkpoint_train_config(checkpoint)):
        tile = config.get("tile")
        if isinstance(tile, int) and not isinstance(tile, bool) and tile > 0:
            return tile
    raise CheckpointError(f"{source}: {checkpoint_kind(checkpoint)} does not record the tile size it was "
                          "trained on (written by an older nfed version)")


def load_weights(model: WNetCD, checkpoint: Checkpoint, source: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into `model`; CheckpointError naming every kind of mismatch."""
    check_state_matches(model.state_dict(), checkpoint.model_state, source)
    model.load_state_dict(checkpoint.model_state)


def _model_device(model: WNetCD):
    first = next(iter(model.parameters()))
    return backend.device_of(first.data)


def _open_log(log_path):
    if log_path is None:
        return None
    return LineLog(log_path)


def _print_epoch(district: str, row: dict, epochs: int, improved: bool) -> None:
    import click

    f1 = "-" if row["val_f1"] is None else f"{row['val_f1']:.4f}"
    loss = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
    mark = " *" if improved else ""
    click.echo(f"{district} epoch {row['epoch']}/{epochs}: train_loss {row['train_loss']:.4f} "
               f"val_loss {loss} val_f1 {f1} ({row['seconds']:.1f}s){mark}", err=True)
