"""Simulated attacks, for measuring the robust aggregators (`nfed federate --simulate-attack`: testing only).

N attacking districts (seeded choice) turn their honest round result into a hostile one before the server
validates it; every hostile update stays well-formed (finite, right shapes, valid BatchNorm statistics), so
only the aggregation can stop it. Kinds, with d = the attacker's honest delta from the global weights:

- sign-flip:        g - 5 d
- noise:            g + N(0, NOISE_STD^2) per coordinate (the training is thrown away)
- scaled:           g + 1000 d
- label-flip:       the attacker trains on inverted masks (change <-> no change)
- sample-inflation: the attacker's honest weights, claiming 10^12 training samples

Weight attacks change the trainable parameters only: BatchNorm running statistics are sent as trained
(a negative variance would be rejected before aggregation).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from nfed.common.errors import ConfigError
from nfed.federation.aggregator import is_statistic

ATTACKS = ("sign-flip", "noise", "scaled", "label-flip", "sample-inflation")
ATTACK_KEY = "simulate_attack"   # the round setup key that makes a client a label-flip attacker
SIGN_FLIP = -5.0
SCALE = 1000.0
NOISE_STD = 1.0
INFLATED_SAMPLES = 10**12


def choose_attackers(districts: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` attacking districts, a seeded choice kept in table order."""
    if count > len(districts):
        raise ConfigError(f"--attackers {count} exceeds the {len(districts)} district(s) federated")
    rng = np.random.default_rng([int(seed), 0xA77AC])
    chosen = set(rng.choice(len(districts), size=count, replace=False).tolist())
    return [name for index, name in enumerate(districts) if index in chosen]


def attack_setup(kind: str, setup):
    """An attacker's round set-up (a RoundSetup): label-flip asks its client to train on inverted masks."""
    return setup.replace(simulate_attack=kind) if kind == "label-flip" else setup


def attack_result(kind: str, result, global_weights: Mapping[str, np.ndarray], rng: np.random.Generator):
    """The hostile ClientResult an attacker sends instead of its honest `result`."""
    if kind == "sample-inflation":
        return replace(result, num_samples=INFLATED_SAMPLES)
    if kind == "label-flip":
        return result
    factor = {"sign-flip": SIGN_FLIP, "scaled": SCALE}.get(kind)
    weights = {}
    for name, value in result.weights.items():
        if is_statistic(name):
            weights[name] = value
            continue
        base = np.asarray(global_weights[name], dtype=np.float64)
        if kind == "noise":
            hostile = base + rng.normal(0.0, NOISE_STD, size=base.shape)
        else:
            hostile = base + factor * (np.asarray(value, dtype=np.float64) - base)
        weights[name] = hostile.astype(value.dtype)
    return replace(result, weights=weights)


class FlippedMasks:
    """A district pack whose training masks read inverted (change <-> no change): a label-flipping client."""

    def __init__(self, pack):
        self._pack = pack

    def __getattr__(self, name):
        return getattr(self._pack, name)

    def read(self, split: str, indices):
        past, current, mask, ids = self._pack.read(split, indices)
        if split == "train":
            mask = (mask == 0).astype(mask.dtype)
        return past, current, mask, ids

    def batches(self, split: str, batch_size: int, *, shuffle: bool = True, augment: bool = False,
                seed: int = 0, device="cpu", drop_last: bool = False):
        from nfed.data.reader import iterate_batches

        return iterate_batches(self, split, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                               device=device, drop_last=drop_last)
