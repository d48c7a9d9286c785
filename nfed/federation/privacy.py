"""Client-level differential privacy: DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", 2018) and its privacy accounting.

Each client clips its update (weights - global, BatchNorm statistics included: they are statistics of private
data) to an L2 norm of C before sending it; the server re-clips (a client that does not clip cannot break the
bound in the clear), sums the clipped deltas, adds Gaussian noise N(0, (z C)^2) to every coordinate of the sum
and divides by the number of clients. Sample counts are ignored: weighting by them would let one district's
share, not C, bound its influence. Negative running variances after the noise are set to 0 (post-processing).

The noise comes from an OS-seeded generator: a DP run is not bit-reproducible, by design (noise that a seed
reproduces protects nothing once the seed is known).

Accounting: the rounds are compositions of the sampled Gaussian mechanism with noise multiplier z and sampling
rate q (share of districts per round; nfed samples a fixed number per round, accounted as Poisson sampling
with that rate, the usual approximation), under add/remove-one-district adjacency. The privacy loss
distribution accountant of Google's dp-accounting package (the `privacy` extra) gives epsilon at a delta,
by default 1 / (the districts' training samples together).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from nfed.common.backend import array_module
from nfed.common.errors import ConfigError, NfedError
from nfed.federation.aggregator import Aggregator, FedAvgAggregator, is_statistic

log = logging.getLogger(__name__)


def update_norm(weights: Mapping[str, object], reference: Mapping[str, object]) -> float:
    """L2 norm of weights - reference over every array (float64)."""
    total = 0.0
    for name, ref in reference.items():
        xp = array_module(ref)
        delta = xp.asarray(weights[name]).astype(xp.float64) - ref.astype(xp.float64)
        total += float(xp.sum(delta * delta))
    return math.sqrt(total)


def clip_factor(norm: float, bound: float) -> float:
    """The factor that brings an update of L2 norm `norm` within `bound` (1 when it already is)."""
    return 1.0 if norm <= bound or norm == 0.0 else bound / norm


def clip_update(weights: Mapping[str, object], reference: Mapping[str, object], bound: float) -> tuple[dict, float]:
    """reference + the update clipped to L2 norm `bound` (reference dtypes), and the update's norm before."""
    norm = update_norm(weights, reference)
    scale = clip_factor(norm, bound)
    if scale == 1.0:
        return dict(weights), norm
    clipped = {}
    for name, ref in reference.items():
        xp = array_module(ref)
        base = ref.astype(xp.float64)
        clipped[name] = (base + scale * (xp.asarray(weights[name]).astype(xp.float64) - base)).astype(ref.dtype)
    return clipped, norm


def noisy_mean(delta_sum: Mapping[str, object], count: int, clip: float, noise_multiplier: float,
               reference: Mapping[str, object], rng) -> dict[str, object]:
    """reference + (sum of clipped deltas + N(0, (z C)^2)) / count, variances kept >= 0 (reference dtypes)."""
    std = noise_multiplier * clip
    new = {}
    for name, ref in reference.items():
        xp = array_module(ref)
        total = xp.asarray(delta_sum[name], dtype=xp.float64)
        if std > 0:
            total = total + xp.asarray(rng.normal(0.0, std, size=ref.shape))
        value = ref.astype(xp.float64) + total / count
        if is_statistic(name) and name.endswith("running_var"):
            value = xp.maximum(value, 0.0)
        new[name] = value.astype(ref.dtype)
    return new


class DPFedAvgAggregator(FedAvgAggregator):
    """DP-FedAvg on the server: re-clip each delta to `clip`, sum (streaming), noise N(0, (z clip)^2), mean."""

    name = "dp-fedavg"
    unusable = "the DP-FedAvg aggregate is unusable"

    def __init__(self, reference: Mapping[str, object], clip: float, noise_multiplier: float, rng=None):
        if not clip > 0:
            raise ConfigError(f"DP-FedAvg needs a clipping bound > 0, got {clip}")
        super().__init__(reference)
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.notes = {"clip": self.clip, "noise_std": self.noise_multiplier * self.clip}

    def _sum_like(self, weights: Mapping[str, object]) -> Mapping[str, object]:
        return self.reference   # deltas are taken against the reference, on its device

    def _fold(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        """Add the update's delta, clipped to `clip` (every client counts the same, whatever its samples)."""
        scale = clip_factor(update_norm(weights, self.reference), self.clip)
        if scale < 1.0 - 1e-6:   # an honest client clipped already (float32 rounding aside)
            self.notes.setdefault("clipped_by_server", []).append(client)
        for name, ref in self.reference.items():
            xp = array_module(ref)
            self._sum[name] += scale * (xp.asarray(weights[name]).astype(xp.float64) - ref.astype(xp.float64))

    def _average(self) -> dict[str, object]:
        return noisy_mean(self._sum, len(self.accepted), self.clip, self.noise_multiplier, self.reference, self.rng)


# ------------------------------------------------------------------------------------------ accounting

def _accounting():
    try:
        import dp_accounting
        from dp_accounting.pld import PLDAccountant
    except ImportError:
        raise ConfigError("differential privacy needs the dp-accounting package for its privacy accounting: "
                          "pip install 'nfed[privacy]'") from None
    return dp_accounting, PLDAccountant


def check_accountant() -> None:
    """ConfigError (naming the extra) when the accountant is not installed."""
    _accounting()


def _event(noise_multiplier: float, rounds: int, sampling_rate: float):
    dp_accounting, _ = _accounting()
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, int(rounds))


def privacy_spent(noise_multiplier: float, rounds: int, sampling_rate: float, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases of the sampled Gaussian mechanism (inf without noise)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    _, accountant_class = _accounting()
    accountant = accountant_class()
    accountant.compose(_event(noise_multiplier, rounds, sampling_rate))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(epsilon: float, rounds: int, sampling_rate: float, delta: float,
                      tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier whose epsilon after `rounds` is at most `epsilon` (0 for inf)."""
    if math.isinf(epsilon):
        return 0.0
    low, high = 0.0, 1.0
    while privacy_spent(high, rounds, sampling_rate, delta) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigError(f"epsilon {epsilon:g} is out of reach for {rounds} round(s)")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if privacy_spent(middle, rounds, sampling_rate, delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


class PrivacyLedger:
    """The privacy a DP-FedAvg run has spent: releases so far, at the run's delta (--dp-delta, else 1 / the
    districts' training samples, counted from their packs when not given) and its client sampling rate."""

    def __init__(self, config, packs: Mapping[str, object], sampling_rate: float,
                 train_samples: Mapping[str, int] | None = None):
        self.config = config
        self.packs = dict(packs)
        self.sampling_rate = sampling_rate
        self.releases = 0
        self._train_samples = dict(train_samples) if train_samples is not None else None
        if config.dp_noise > 0:
            check_accountant()

    def delta(self) -> float:
        if self.config.dp_delta is not None:
            return self.config.dp_delta
        if self._train_samples is None:
            from nfed.data.reader import DistrictPack

            try:
                counts = {}
                for district, path in self.packs.items():
                    with DistrictPack(path) as pack:
                        counts[district] = pack.num_samples("train")
            except NfedError as exc:
                raise ConfigError(f"cannot count the training samples for the privacy accounting ({exc}): "
                                  "give --dp-delta") from None
            self._train_samples = counts
        return 1.0 / max(sum(self._train_samples.values()), 1)

    def resume(self, records) -> None:
        """Continue the count of releases of a resumed run's round history."""
        self.releases = sum(1 for r in records if (r.get("privacy") or {}).get("released"))

    def record(self, released: bool) -> dict:
        """The round record's privacy entry: epsilon spent so far at the run's delta (inf: no guarantee)."""
        cfg = self.config
        self.releases += int(released)
        delta = self.delta()
        epsilon = (privacy_spent(cfg.dp_noise, self.releases, self.sampling_rate, delta) if cfg.dp_noise > 0
                   else math.inf)
        return {"released": released, "releases": self.releases, "epsilon": epsilon, "delta": delta,
                "noise_multiplier": cfg.dp_noise, "clip": cfg.dp_clip, "sampling_rate": self.sampling_rate}


# ------------------------------------------------------------------------------------ secure aggregation

@dataclass
class SecureAggregate:
    """What a secure-aggregation round revealed: the weighted mean of the clients' deltas (sum_i w_i d_i /
    sum_i w_i, never one d_i; None with `problem` when nothing usable was revealed), the total weight, who
    took part, and the round record's notes on the protocol."""

    mean_delta: dict[str, np.ndarray] | None
    total_weight: float = 0.0
    clients: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    problem: str | None = None


class SecureSumAggregator(Aggregator):
    """The round's aggregator when the runner summed the updates under secure aggregation: the server only
    adds the revealed mean delta to the global weights, or, with DP-FedAvg (clients clipped, weights 1),
    noise to the revealed sum first."""

    name = "secure-fedavg"
    unusable = "the secure aggregate is unusable"

    def __init__(self, reference: Mapping[str, object], aggregate: SecureAggregate, dp_clip: float = 0.0,
                 dp_noise: float = 0.0, rng=None):
        super().__init__(reference)   # the updates were added by the runner's secure sum, not here
        self.aggregate = aggregate
        self.dp_clip, self.dp_noise = float(dp_clip), float(dp_noise)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accepted = list(aggregate.clients) if aggregate.mean_delta is not None else []
        self.problem = aggregate.problem
        self.notes = dict(aggregate.notes)
        if self.dp_clip > 0:
            self.notes.update(clip=self.dp_clip, noise_std=self.dp_noise * self.dp_clip)

    def finish(self) -> dict[str, object] | None:
        mean = self.aggregate.mean_delta
        if mean is None:
            return None
        if self.dp_clip > 0:
            total = {name: np.asarray(value, dtype=np.float64) * self.aggregate.total_weight
                     for name, value in mean.items()}
            new = noisy_mean(total, len(self.accepted), self.dp_clip, self.dp_noise, self.reference, self.rng)
        else:
            new = {name: (ref.astype(np.float64) + np.asarray(mean[name], dtype=np.float64)).astype(ref.dtype)
                   for name, ref in self.reference.items()}
        return self._usable(new)
