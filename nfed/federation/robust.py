"""Robust aggregation against well-formed but hostile updates, and caps on claimed sample counts.

One client that scales its weights or claims 10^12 samples takes over a FedAvg average. The aggregators here
share FedAvgAggregator's interface (`add` validates and keeps an update, `finish` returns the new weights or
None, `accepted`/`rejected`/`problem`, plus `notes` for the round record) and work on each update's delta
from the round's global weights:

- median:        coordinate-wise median of the deltas (unweighted).
- trimmed-mean:  coordinate-wise mean after dropping the floor(beta * n) largest and smallest (unweighted).
- multi-krum:    the m updates closest to their n - f - 2 nearest neighbours (Blanchard et al. 2017, El Mhamdi
                 et al. 2018), averaged by sample count.
- clipped:       FedAvg with each delta's L2 norm clipped to clip_factor x the round's median delta norm.

Memory (P: the model's bytes, n: accepted updates): FedAvg streams (one float64 model, whatever n). Every
aggregator here holds all n updates as received (n x P: 25 x 269 MB = 6.7 GB at w = 64) and works on float64
slices of CHUNK coordinates of all n at once (n x 8 MB); multi-Krum adds an n x n distance matrix.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Mapping

import numpy as np

from nfed.common.backend import array_module
from nfed.common.errors import ConfigError
from nfed.federation.aggregator import Aggregator, FedAvgAggregator, sample_count_problem

log = logging.getLogger(__name__)

AGGREGATORS = ("fedavg", "median", "trimmed-mean", "multi-krum", "clipped")
CHUNK = 1 << 20   # coordinates per slice: bounds the float64 temporaries to n x 8 MB


class BufferedAggregator(Aggregator):
    """Keeps every accepted update; `finish` turns their deltas into the round's delta (`_combine`)."""

    name = "buffered"

    def __init__(self, reference: Mapping[str, object]):
        super().__init__(reference)
        self._updates: list[Mapping[str, object]] = []
        self._counts: list[int] = []

    @property
    def unusable(self) -> str:
        return f"the {self.name} aggregate is unusable"

    def _take(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        self._updates.append(weights)
        self._counts.append(num_samples)

    def finish(self) -> dict[str, object] | None:
        if not self._updates:
            return None
        delta = self._combine()
        self._updates, self._counts = [], []
        new = {}
        for name, ref in self.reference.items():
            xp = array_module(ref)
            new[name] = (ref.astype(xp.float64) + delta[name]).astype(ref.dtype)
        return self._usable(new)

    # -- helpers for subclasses
    def _slices(self) -> Iterator[tuple[str, slice, object]]:
        """(name, coordinate slice, float64 [n, k] deltas of every update) over the whole model."""
        for name, ref in self.reference.items():
            xp = array_module(ref)
            flat_ref = ref.reshape(-1)
            for start in range(0, max(flat_ref.size, 1), CHUNK):
                part = slice(start, min(start + CHUNK, flat_ref.size))
                stacked = xp.stack([xp.asarray(w[name]).reshape(-1)[part] for w in self._updates]).astype(xp.float64)
                yield name, part, stacked - flat_ref[part].astype(xp.float64)

    def _per_coordinate(self, reduce) -> dict[str, object]:
        """name -> float64 delta from `reduce(deltas [n, k]) -> [k]` applied slice by slice."""
        out = {name: array_module(ref).zeros(ref.size, dtype=np.float64) for name, ref in self.reference.items()}
        for name, part, deltas in self._slices():
            out[name][part] = reduce(deltas)
        return {name: out[name].reshape(ref.shape) for name, ref in self.reference.items()}

    def _weighted(self, factors) -> dict[str, object]:
        """name -> sum_i factors[i] * delta_i (factors already normalised)."""
        factors = np.asarray(factors, dtype=np.float64)
        return self._per_coordinate(lambda deltas: array_module(deltas).asarray(factors) @ deltas)

    def _combine(self) -> dict[str, object]:
        raise NotImplementedError


class MedianAggregator(BufferedAggregator):
    """Coordinate-wise median of the deltas (mean of the middle two for an even count); sample counts are
    ignored, so an inflated count buys nothing."""

    name = "median"

    def _combine(self):
        return self._per_coordinate(lambda deltas: array_module(deltas).median(deltas, axis=0))


class TrimmedMeanAggregator(BufferedAggregator):
    """Coordinate-wise mean after dropping the floor(beta * n) largest and smallest values (Yin et al. 2018);
    at most (n - 1) // 2 per side, so one value always remains."""

    name = "trimmed-mean"

    def __init__(self, reference, beta: float = 0.2):
        super().__init__(reference)
        self.beta = float(beta)

    def _combine(self):
        n = len(self._updates)
        trim = min(int(math.floor(self.beta * n)), (n - 1) // 2)
        self.notes = {"trimmed_per_side": trim}
        return self._per_coordinate(
            lambda deltas: array_module(deltas).sort(deltas, axis=0)[trim:n - trim].mean(axis=0))


class MultiKrumAggregator(BufferedAggregator):
    """Multi-Krum: score each update by the summed squared distances to its n - f - 2 nearest others, keep the
    m lowest (m = 0: n - f) and average them by sample count. f is lowered to (n - 3) // 2 when fewer updates
    arrived than Krum needs (n > 2f + 2), and the record says so."""

    name = "multi-krum"

    def __init__(self, reference, f: int = 1, m: int = 0):
        super().__init__(reference)
        self.f, self.m = int(f), int(m)

    def _distances(self) -> np.ndarray:
        n = len(self._updates)
        distances = np.zeros((n, n), dtype=np.float64)
        for _, _, deltas in self._slices():
            xp = array_module(deltas)
            gram = deltas @ deltas.T
            squares = xp.diag(gram)
            distances += np.asarray(_host(squares[:, None] + squares[None, :] - 2.0 * gram))
        np.fill_diagonal(distances, 0.0)
        return np.maximum(distances, 0.0)

    def _combine(self):
        n = len(self._updates)
        f = min(self.f, max(0, (n - 3) // 2))
        m = n - f if self.m == 0 else min(self.m, n - f)
        distances = self._distances()
        neighbours = max(n - f - 2, 0)
        scores = np.array([np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)])
        chosen = sorted(np.argsort(scores, kind="stable")[:m].tolist())
        self.notes = {"f": f, "m": m, "selected": [self.accepted[i] for i in chosen],
                      "scores": {self.accepted[i]: float(scores[i]) for i in range(n)}}
        if f != self.f:
            self.notes["f_lowered_from"] = self.f
        counts = np.array([self._counts[i] for i in chosen], dtype=np.float64)
        factors = np.zeros(n)
        factors[chosen] = counts / counts.sum()
        return self._weighted(factors)


class ClippedFedAvgAggregator(BufferedAggregator):
    """FedAvg of the deltas, each clipped to an L2 norm of clip_factor x the round's median delta norm (so one
    scaled update moves the model no further than a typical honest one)."""

    name = "clipped"

    def __init__(self, reference, clip_factor: float = 1.0):
        super().__init__(reference)
        self.clip_factor = float(clip_factor)

    def _combine(self):
        n = len(self._updates)
        squares = np.zeros(n)
        for _, _, deltas in self._slices():
            squares += np.asarray(_host(array_module(deltas).sum(deltas * deltas, axis=1)))
        norms = np.sqrt(squares)
        bound = self.clip_factor * float(np.median(norms))
        scales = np.array([1.0 if norm <= bound or norm == 0.0 else bound / norm for norm in norms])
        self.notes = {"bound": bound, "clipped": {self.accepted[i]: round(float(norms[i] / bound), 4)
                                                  for i in range(n) if scales[i] < 1.0}}
        counts = np.asarray(self._counts, dtype=np.float64)
        return self._weighted(scales * counts / counts.sum())


def _host(array):
    get = getattr(array, "get", None)
    return get() if callable(get) else array


def build_aggregator(config, reference: Mapping[str, object]):
    """The aggregator of one round for a FederationConfig (`aggregator`, its parameters, and DP-FedAvg when
    `dp_clip` > 0)."""
    name = config.aggregator
    if getattr(config, "dp_clip", 0.0):
        from nfed.federation.privacy import DPFedAvgAggregator

        return DPFedAvgAggregator(reference, clip=config.dp_clip, noise_multiplier=config.dp_noise)
    if name == "fedavg":
        return FedAvgAggregator(reference)
    if name == "median":
        return MedianAggregator(reference)
    if name == "trimmed-mean":
        return TrimmedMeanAggregator(reference, beta=config.trim_beta)
    if name == "multi-krum":
        return MultiKrumAggregator(reference, f=config.krum_f, m=config.krum_m)
    if name == "clipped":
        return ClippedFedAvgAggregator(reference, clip_factor=config.clip_factor)
    raise ConfigError(f"unknown aggregator '{name}' (choose {', '.join(AGGREGATORS)})")


# ------------------------------------------------------------------------------------- sample-count caps

def registered_samples() -> dict[str, int]:
    """district -> its sample count in data/districts.csv (the most training samples it can claim)."""
    from nfed.data.districts import load_districts

    return {district.name: int(district.samples) for district in load_districts()}


def cap_sample_counts(claims: Mapping[str, object], registered: Mapping[str, int], max_share: float = 1.0,
                      announced: Mapping[str, int] | None = None) -> tuple[dict[str, object], dict[str, str]]:
    """The weights the claimed sample counts may carry, and why each changed one was cut.

    A claim above the count the district's pack announced when it joined (`announced`: read from the pack
    in-process, the node's description over Flower) or above its registered count is cut to the lower of them;
    then, with max_share < 1, the largest claims are cut to one level t so that none holds more than max_share
    of the round's total (water-filling; when that cannot hold, as for 2 clients and a share of 0.5, every
    client weighs the same). Malformed claims pass unchanged (the aggregator rejects them).
    """
    weights = dict(claims)
    reasons: dict[str, str] = {}
    valid = [d for d, n in claims.items() if sample_count_problem(n) is None]
    for district in valid:
        limits = []
        if (count := (announced or {}).get(district)) is not None:
            limits.append((int(count), "announced"))
        if (count := registered.get(district)) is not None:
            limits.append((int(count), "registered"))
        if limits:
            limit, source = min(limits)
            if claims[district] > limit:
                weights[district] = limit
                reasons[district] = f"claimed {claims[district]} samples, {source} {limit}"
    if max_share < 1.0 and len(valid) >= 2:
        level = _share_level([weights[d] for d in valid], max_share)
        for district in valid:
            if weights[district] > level:
                reason = f"claimed {claims[district]} samples, cut to {level} (max share {max_share:g})"
                weights[district] = level
                reasons[district] = reason
    for district, reason in reasons.items():
        log.warning("sample count of %s capped: %s", district, reason)
    return weights, reasons


def _share_level(counts: list[int], share: float) -> int:
    """The level t with max(min(c, t)) <= share * sum(min(c, t)), cutting as little as possible."""
    values = sorted(int(c) for c in counts)
    k = len(values)
    if values[-1] <= share * sum(values):
        return values[-1]
    below = 0   # sum of the `uncut` smallest values
    best = None
    for uncut in range(k):
        cut = k - uncut
        if 1.0 - share * cut > 0:
            level = share * below / (1.0 - share * cut)
            if (uncut == 0 or values[uncut - 1] <= level) and level <= values[uncut]:
                best = level
                break
        below += values[uncut]
    if best is None or best < 1:
        return values[0]   # no level satisfies the share: every client weighs the smallest count
    return max(int(math.floor(best)), 1)
