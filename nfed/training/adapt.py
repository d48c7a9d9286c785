"""AdaBN: a model's BatchNorm statistics re-estimated on one district's own tiles (issue 24, feature shift).

Districts differ in how their imagery looks; re-estimating only the running mean and variance of every
BatchNorm layer on a district's tiles (forward passes, no labels, no gradient, no parameter change) adapts a
federated model to it. The statistics are the exact population ones of each layer's input over the whole split
(as a cumulative-average BatchNorm, PyTorch's momentum=None, gives for one batch holding the split): every batch
runs in training-mode BatchNorm, as in training (both dates through the contracting path as one batch), and the
per-batch mean and variance of each layer are pooled (Chan's parallel formula, float64) into its mean and unbiased
variance. Each batch is normalised by its own statistics on the way, as in training, so deeper layers' statistics
depend a little on the batch size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nfed.common import backend
from nfed.common.backend import to_numpy
from nfed.common.errors import DataError
from nfed.core import nn
from nfed.core.autograd import no_grad
from nfed.model.checkpoint import save_checkpoint
from nfed.model.wnet import LEVELS, WNetCD

UNSET = -1.0   # a variance no BatchNorm writes: marks the layers a forward pass did not reach


def _values_per_tile(name: str, model: WNetCD, tile: int) -> int:
    """How many values per channel one tile gives the BatchNorm `name` (<part>.<layer>.<bn>, see nfed.model.wnet):
    level l works at tile / 2^(l-1); the siamese contracting path (encoder e1..e5) sees both dates."""
    part, layer = name.split(".")[:2]
    side = tile >> (int(layer[1:]) - 1)
    dates = 2 if getattr(model, part).siamese and layer.startswith("e") else 1
    return dates * side * side


class _Pooled:
    """Count, mean and sum of squared deviations of one layer's input per channel, merged batch by batch."""

    def __init__(self, channels: int):
        self.count, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

    def add(self, count: int, mean: np.ndarray, biased_var: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.m2 += biased_var * count + delta * delta * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total


def adapt_batchnorm(model: WNetCD, pack, split: str = "train", batch_size: int = 8, *, device=None) -> int:
    """Set every BatchNorm layer's running mean and variance to the statistics of its input over the pack's
    `split` (module docstring); nothing else of the model changes. Returns the number of tiles used."""
    if device is None:   # the batches go where the model is (not to $NFED_DEVICE's default)
        device = backend.device_of(next(iter(model.parameters())).data)
    tiles = pack.num_samples(split)
    if tiles == 0:
        raise DataError(f"{pack.path}: the pack has no {split} tiles to adapt on")
    if pack.tile % 2 ** (LEVELS - 1):
        raise DataError(f"{pack.path}: tile {pack.tile} is not a multiple of {2 ** (LEVELS - 1)}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.running_mean.copy(), m.running_var.copy()) for _, m in layers]
    pooled = [_Pooled(m.num_features) for _, m in layers]
    per_tile = [_values_per_tile(name, model, pack.tile) for name, _ in layers]
    was_training = model.training
    model.train()
    try:
        for _, m in layers:
            m.momentum = 1.0   # after a batch, the running buffers hold its mean and unbiased variance
        with no_grad():
            for batch in pack.batches(split, batch_size, shuffle=False, augment=False, device=device):
                for _, m in layers:
                    m.running_var[...] = UNSET
                model(batch.past, batch.current)
                for (_, m), stats, values in zip(layers, pooled, per_tile):
                    unbiased = to_numpy(m.running_var).astype(np.float64)
                    if (unbiased < 0).any():   # not reached (the decoder when lambda_rec is 0)
                        continue
                    count = values * len(batch.ids)
                    stats.add(count, to_numpy(m.running_mean).astype(np.float64), unbiased * (count - 1) / count)
    finally:
        for (_, m), (momentum, mean, var) in zip(layers, saved):
            m.momentum = momentum
            m.running_mean[...], m.running_var[...] = mean, var
        model.train(was_training)
    for (_, m), stats in zip(layers, pooled):
        if stats.count > 1:
            m.running_mean[...] = _like(stats.mean, m.running_mean)
            m.running_var[...] = _like(stats.m2 / (stats.count - 1), m.running_var)
    return int(tiles)


def _like(values: np.ndarray, buffer):
    """`values` as the buffer's dtype on the buffer's device."""
    return backend.to_device(values.astype(buffer.dtype), backend.device_of(buffer))


def adapt_checkpoint(model_path: str | os.PathLike, pack_path: str | os.PathLike, out_path: str | os.PathLike, *,
                     split: str = "train", batch_size: int = 8, env=None) -> dict:
    """Write `out_path`: the checkpoint at `model_path` with its BatchNorm statistics re-estimated on the pack's
    `split` (atomic; its config records `adapted_on` and `adapted_from`). Returns what `adapted_on` records."""
    from nfed.data.reader import DistrictPack
    from nfed.training.environment import default_environment
    from nfed.training.trainer import model_from_checkpoint

    env = env or default_environment()
    model, checkpoint = model_from_checkpoint(model_path, device=env.device)
    with env.active(), DistrictPack(pack_path) as pack:
        tiles = adapt_batchnorm(model, pack, split, batch_size)
        adapted_on = {"district": pack.district, "split": split, "tiles": tiles, "batch_size": int(batch_size)}
    config = dict(checkpoint.config)
    if not isinstance(config.get("train"), dict):   # a train-local config: nested, so the new keys sit beside it
        config = {"train": config}
    config.update(adapted_on=adapted_on, adapted_from=str(Path(model_path).resolve()))
    save_checkpoint(out_path, {k: to_numpy(v) for k, v in model.state_dict().items()}, config=config,
                    round=checkpoint.round)
    return adapted_on
