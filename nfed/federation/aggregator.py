"""Server side of federated averaging: update validation and streaming FedAvg.

Everything here works on plain dicts name -> array (numpy or cupy), with no process or file assumptions,
so the in-process federation and the Flower server use the same code:

    aggregator = FedAvgAggregator(global_weights)      # begin a round
    for update in updates:
        aggregator.add(update.weights, update.num_samples, client=update.district)   # False + reason if rejected
    averaged = aggregator.finish()                     # weighted by sample count (None: nobody accepted)
    new_global = server_optimizer.step(global_weights, averaged)   # nfed.federation.server_optim

The average is accumulated in a streaming way (one running sum, the memory of one model in float64), whatever
the number of clients (on a GPU, when the weights are CuPy arrays, by nfed.gpu.fedavg's one-pass kernel);
the robust aggregators of nfed.federation.robust, which need every update at once, share its
interface and its validation. BatchNorm running statistics are averaged like every parameter.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import numpy as np

from nfed.common import backend
from nfed.common.backend import array_module

log = logging.getLogger(__name__)

STATISTIC_SUFFIXES = ("running_mean", "running_var")


def is_statistic(name: str) -> bool:
    """True for BatchNorm running statistics (state that is averaged but never trained)."""
    return name.rsplit(".", 1)[-1] in STATISTIC_SUFFIXES


def trainable(weights: Mapping[str, object]) -> dict[str, object]:
    """The weights without BatchNorm running statistics (what the norm-difference stop rule compares:
    the statistics keep moving with the data long after the parameters have settled)."""
    return {name: value for name, value in weights.items() if not is_statistic(name)}


def update_problem(weights: Mapping[str, object], reference: Mapping[str, object]) -> str | None:
    """Why a client's weights cannot be averaged into `reference`'s model (None: they can).

    Checks the names (none missing, none unexpected), that every value is an array of the reference's shape
    and kind of dtype (floating point for floating point), that it stays finite once cast to the reference's
    dtype (1e300 in float64 is inf in float32), and that BatchNorm variances are not negative.
    """
    if not isinstance(weights, Mapping):
        return f"weights are a {type(weights).__name__}, not a mapping name -> array"
    missing = [name for name in reference if name not in weights]
    unexpected = [name for name in weights if name not in reference]
    if missing:
        return f"missing {len(missing)} array(s), e.g. {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected array(s), e.g. {str(unexpected[0])[:80]}"
    for name, ref in reference.items():
        value = weights[name]
        dtype = getattr(value, "dtype", None)
        if dtype is None or not hasattr(value, "shape"):
            return f"{name} is a {type(value).__name__}, not an array"
        if tuple(value.shape) != tuple(ref.shape):
            return f"{name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if dtype.kind != ref.dtype.kind:
            return f"{name} has dtype {dtype}, expected {ref.dtype}"
        xp = array_module(value)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(ref.dtype, copy=False)
        if dtype.kind in "fc" and not bool(xp.all(xp.isfinite(cast))):
            overflow = bool(xp.all(xp.isfinite(value)))
            return f"{name} " + (f"overflows {ref.dtype}" if overflow else "holds NaN or infinite values")
        if is_statistic(name) and name.endswith("running_var") and cast.size and bool(xp.any(cast < 0)):
            return f"{name} holds negative variances"
    return None


def sample_count_problem(num_samples) -> str | None:
    """Why a claimed number of training samples cannot weigh an update (None: it can)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        return f"number of samples is {str(num_samples)[:40]!r}, must be a positive integer"
    return None


def accept_update(aggregator, weights: Mapping[str, object], num_samples, client: str) -> bool:
    """Validate an update against `aggregator.reference`; a refused one is logged and kept in
    `aggregator.rejected` (every aggregator refuses the same updates for the same reasons)."""
    problem = update_problem(weights, aggregator.reference) or sample_count_problem(num_samples)
    if problem is not None:
        log.warning("rejected update from %s: %s", client, problem)
        aggregator.rejected[client] = problem
        return False
    return True


class Aggregator:
    """The interface a round is aggregated through, whatever the rule (FedAvg, the robust rules, DP-FedAvg, a
    secure sum): `add` validates one client's update against `reference` and takes it in (`_take`), or refuses it
    (False; why in `rejected`); `finish` gives the aggregate in the reference's dtypes, or None (why in `problem`
    when it was unusable). `accepted`, `total_samples` and `notes` go into the round record."""

    name = "aggregator"
    unusable = "the aggregate is unusable"

    def __init__(self, reference: Mapping[str, object]):
        self.reference = reference
        self.total_samples = 0
        self.accepted: list[str] = []
        self.rejected: dict[str, str] = {}
        self.problem: str | None = None   # why `finish` had no usable aggregate
        self.notes: dict = {}             # what the round record tells about the aggregation (robust ones)

    def add(self, weights: Mapping[str, object], num_samples: int, client: str = "client") -> bool:
        """Take one update in; False (reason logged and kept in `rejected`) when it cannot be aggregated."""
        if not accept_update(self, weights, num_samples, client):
            return False
        self._take(weights, int(num_samples), client)
        self.total_samples += int(num_samples)
        self.accepted.append(client)
        return True

    def _take(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, object] | None:
        raise NotImplementedError

    def _usable(self, aggregate: dict[str, object]) -> dict[str, object] | None:
        """`aggregate`, or None with `problem` said when it cannot be the new global weights (finite updates can
        still sum past the dtype's range)."""
        problem = update_problem(aggregate, self.reference)
        if problem is None:
            return aggregate
        self.problem = f"{self.unusable} ({problem})"
        log.warning("%s", self.problem)
        return None


class FedAvgAggregator(Aggregator):
    """One round of federated averaging, weighted by each client's number of training samples.

    `add` validates and folds an update into a running weighted sum (so memory stays that of one model),
    `finish` returns the average with the reference's dtypes, or None when no update was accepted.
    """

    name = "fedavg"
    unusable = "the average is unusable"

    def __init__(self, reference: Mapping[str, object]):
        super().__init__(reference)
        self._sum: dict[str, object] | None = None

    def _take(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        if self._sum is None:   # float64 running sums on the device of the update's arrays
            self._sum = {name: array_module(value).zeros(value.shape, dtype=np.float64)
                         for name, value in self._sum_like(weights).items()}
        self._fold(weights, num_samples, client)

    def _sum_like(self, weights: Mapping[str, object]) -> Mapping[str, object]:
        """The arrays whose shapes and devices the running sums take (FedAvg: the first update's)."""
        return weights

    def _fold(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        """Add one accepted update to the float64 running sums (FedAvg: weighted by its sample count)."""
        for name, value in weights.items():
            _accumulate(self._sum[name], value, float(num_samples))

    def _average(self) -> dict[str, object]:
        """The new global weights from the running sums (FedAvg: the sample-weighted mean, reference dtypes); each
        float64 sum is divided in place and let go as its average is made, so the sums and the average are never
        held whole together (the server's peak memory, issue 26)."""
        total = float(self.total_samples)
        average = {}
        for name in list(self._sum):
            summed = self._sum.pop(name)
            summed /= total
            average[name] = summed.astype(self.reference[name].dtype)
        return average

    def finish(self) -> dict[str, object] | None:
        """The aggregate (reference dtypes), or None when every update was rejected or the result is unusable."""
        if self._sum is None:
            return None
        aggregate = self._average()
        self._sum = None
        return self._usable(aggregate)


_ACCUMULATE_BLOCK = 1 << 18   # elements: the CPU's float64 temporary is 2 MB, not a copy of the largest tensor


def _accumulate(total, value, weight: float) -> None:
    """total += weight * value in place (float64 total): one kernel pass on a GPU; on the CPU a block at a time,
    so the server's peak stays the running sums and the reply in flight (a w64 model's largest tensor in float64
    is 0.28 models' worth, issue 26's memory goal)."""
    if backend.is_gpu_array(total) and backend.is_gpu_array(value):
        from nfed.gpu import fedavg as gpu_fedavg  # noqa: PLC0415 - GPU only: importing nfed never loads CuPy

        try:
            gpu_fedavg.weighted_accumulate(total, value, weight)
            return
        except backend.Unsupported:  # dtypes the kernel does not take
            pass
    xp = array_module(value)
    if xp is not np:   # a device array of a dtype the kernel does not take: one float64 temporary of the tensor
        product = value.astype(xp.float64)
        product *= weight
        total += product
        return
    flat_total, flat_value = total.reshape(-1), np.asarray(value).reshape(-1)
    block = np.empty(min(flat_value.size, _ACCUMULATE_BLOCK), dtype=np.float64)
    for start in range(0, flat_value.size, _ACCUMULATE_BLOCK):
        stop = min(start + _ACCUMULATE_BLOCK, flat_value.size)
        product = block[:stop - start]
        product[...] = flat_value[start:stop]   # float64(value) * weight, as before, a block at a time
        product *= weight
        flat_total[start:stop] += product


def fedavg(updates, reference: Mapping[str, object] | None = None) -> dict[str, object] | None:
    """Weighted average of [(weights, num_samples), ...] (the reference defaults to the first update)."""
    updates = list(updates)
    if not updates:
        return None
    aggregator = FedAvgAggregator(reference if reference is not None else updates[0][0])
    for index, (weights, num_samples) in enumerate(updates):
        aggregator.add(weights, num_samples, client=f"update {index}")
    return aggregator.finish()


# ---------------------------------------------------------------------------------------------- norms

def global_norm(weights: Mapping[str, object]) -> float:
    """Euclidean norm of all arrays together, as one long vector."""
    total = 0.0
    for value in weights.values():
        xp = array_module(value)
        v = value.astype(xp.float64)
        total += float(xp.sum(v * v))
    return math.sqrt(total)


def relative_norm_difference(new: Mapping[str, object], old: Mapping[str, object]) -> float:
    """||new - old|| / ||old|| over every array (inf when old is all zeros and new is not)."""
    diff = 0.0
    for name, value in new.items():
        xp = array_module(value)
        d = value.astype(xp.float64) - old[name].astype(xp.float64)
        diff += float(xp.sum(d * d))
    base = global_norm(old)
    if base == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff) / base
