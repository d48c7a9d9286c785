"""Server side of federated averaging: update validation, streaming FedAvg, server optimisers, stop rules.

Everything here works on plain dicts name -> array (numpy or cupy), with no process or file assumptions,
so the in-process federation and the Flower server use the same code:

    aggregator = FedAvgAggregator(global_weights)      # begin a round
    for update in updates:
        aggregator.add(update.weights, update.num_samples, client=update.district)   # False + reason if rejected
    averaged = aggregator.finish()                     # weighted by sample count (None: nobody accepted)
    new_global = server_optimizer.step(global_weights, averaged)

The average is accumulated in a streaming way (one running sum, the memory of one model in float64), whatever
the number of clients (on a GPU, when the weights are CuPy arrays, by nfed.gpu.fedavg's one-pass kernel);
the robust aggregators of nfed.federation.robust, which need every update at once, share its
interface and its validation. BatchNorm running statistics are averaged like every parameter; server optimisers move
only the trainable parameters and take the plain average for such statistics (a momentum or Adam step on a
running variance could make it negative).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from nfed.common import backend
from nfed.common.backend import array_module
from nfed.common.errors import CheckpointError, ConfigError
from nfed.common.validate import check_fields, check_number

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


class FedAvgAggregator:
    """One round of federated averaging, weighted by each client's number of training samples.

    `add` validates and folds an update into a running weighted sum (so memory stays that of one model),
    `finish` returns the average with the reference's dtypes, or None when no update was accepted.
    """

    name = "fedavg"

    def __init__(self, reference: Mapping[str, object]):
        self.reference = reference
        self._sum: dict[str, object] | None = None
        self.total_samples = 0
        self.accepted: list[str] = []
        self.rejected: dict[str, str] = {}
        self.problem: str | None = None   # why `finish` had no usable average
        self.notes: dict = {}              # what the round record tells about the aggregation (robust ones)

    def add(self, weights: Mapping[str, object], num_samples: int, client: str = "client") -> bool:
        """Fold one update in; False (reason logged and kept in `rejected`) when it cannot be averaged."""
        if not accept_update(self, weights, num_samples, client):
            return False
        if self._sum is None:   # float64 running sums on the device of the update's arrays
            self._sum = {name: array_module(value).zeros(value.shape, dtype=np.float64)
                         for name, value in self._sum_like(weights).items()}
        self._fold(weights, num_samples, client)
        self.total_samples += int(num_samples)
        self.accepted.append(client)
        return True

    def _sum_like(self, weights: Mapping[str, object]) -> Mapping[str, object]:
        """The arrays whose shapes and devices the running sums take (FedAvg: the first update's)."""
        return weights

    def _fold(self, weights: Mapping[str, object], num_samples: int, client: str) -> None:
        """Add one accepted update to the float64 running sums (FedAvg: weighted by its sample count)."""
        for name, value in weights.items():
            _accumulate(self._sum[name], value, float(num_samples))

    def _average(self) -> dict[str, object]:
        """The new global weights from the running sums (FedAvg: the sample-weighted mean, reference dtypes)."""
        total = float(self.total_samples)
        return {name: (summed / total).astype(self.reference[name].dtype) for name, summed in self._sum.items()}

    unusable = "the average is unusable"

    def finish(self) -> dict[str, object] | None:
        """The aggregate (reference dtypes), or None when every update was rejected or the result is unusable."""
        if self._sum is None:
            return None
        aggregate = self._average()
        self._sum = None
        problem = update_problem(aggregate, self.reference)
        if problem is not None:   # finite updates can still sum past the dtype's range
            self.problem = f"{self.unusable} ({problem})"
            log.warning("%s", self.problem)
            return None
        return aggregate


def _accumulate(total, value, weight: float) -> None:
    """total += weight * value in place (float64 total): one kernel pass on a GPU, no float64 copy of value."""
    if backend.is_gpu_array(total) and backend.is_gpu_array(value):
        from nfed.gpu import fedavg as gpu_fedavg  # noqa: PLC0415 - GPU only: importing nfed never loads CuPy

        try:
            gpu_fedavg.weighted_accumulate(total, value, weight)
            return
        except backend.Unsupported:  # dtypes the kernel does not take
            pass
    total += value.astype(array_module(value).float64) * weight


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


# ------------------------------------------------------------------------------------ server optimisers

class ServerOptimizer:
    """Turns the clients' average into the next global model. Plain FedAvg: the average itself.

    Subclasses treat `global - average` as a pseudo-gradient of the trainable parameters (Reddi et al.,
    "Adaptive Federated Optimization", 2021); BatchNorm statistics always take the average.
    """

    name = "fedavg"

    def __init__(self, lr: float = 1.0):
        self.lr = check_number("server_lr", lr)
        self.steps = 0

    def step(self, global_weights: Mapping[str, object], averaged: Mapping[str, object]) -> dict:
        self.steps += 1
        new = {}
        for name, avg in averaged.items():
            if is_statistic(name):
                new[name] = avg
            else:
                new[name] = self._update(name, global_weights[name], avg)
        return new

    def _update(self, name, current, averaged):
        if self.lr == 1.0:
            return averaged
        return (current + self.lr * (averaged - current)).astype(current.dtype)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"steps": np.asarray(self.steps, dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if "steps" not in state:
            raise CheckpointError(f"server optimiser '{self.name}' state lacks 'steps'")
        self.steps = int(np.asarray(state["steps"]))
        for key, value in state.items():
            if key == "steps":
                continue
            kind, _, param = key.partition(".")
            buffers = self._buffers().get(kind)
            if buffers is None or not param:
                raise CheckpointError(f"server optimiser '{self.name}' state has unexpected entry '{key}'")
            if value.dtype.kind != "f" or not bool(np.all(np.isfinite(value))):
                raise CheckpointError(f"server optimiser '{self.name}' state entry '{key}' is not finite floats")
            buffers[param] = np.array(value)

    def _buffers(self) -> dict[str, dict]:
        return {}


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: v = beta * v + (global - average); global -= lr * v."""

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = check_number("server_momentum", momentum)
        self.velocity: dict[str, object] = {}

    def _update(self, name, current, averaged):
        xp = array_module(current)
        pseudo_grad = current.astype(xp.float32) - averaged.astype(xp.float32)
        if name in self.velocity:
            velocity = self.momentum * xp.asarray(self.velocity[name]) + pseudo_grad
        else:
            velocity = pseudo_grad
        self.velocity[name] = velocity
        return (current - self.lr * velocity).astype(current.dtype)

    def state_dict(self):
        state = super().state_dict()
        state.update({f"velocity.{n}": _host(v) for n, v in self.velocity.items()})
        return state

    def _buffers(self):
        return {"velocity": self.velocity}


class FedAdam(ServerOptimizer):
    """Adam on the server: m, v of the pseudo-gradient (average - global), step lr * m / (sqrt(v) + tau)."""

    name = "fedadam"

    def __init__(self, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3):
        super().__init__(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"FedAdam betas must be in [0, 1), got {betas}")
        if not tau > 0:
            raise ConfigError(f"FedAdam tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.exp_avg: dict[str, object] = {}
        self.exp_avg_sq: dict[str, object] = {}

    def _update(self, name, current, averaged):
        xp = array_module(current)
        delta = averaged.astype(xp.float32) - current.astype(xp.float32)
        m = xp.asarray(self.exp_avg.get(name, xp.zeros_like(delta)))
        v = xp.asarray(self.exp_avg_sq.get(name, xp.zeros_like(delta)))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.beta2 * v + (1 - self.beta2) * delta * delta
        self.exp_avg[name], self.exp_avg_sq[name] = m, v
        return (current + self.lr * m / (xp.sqrt(v) + self.tau)).astype(current.dtype)

    def state_dict(self):
        state = super().state_dict()
        state.update({f"exp_avg.{n}": _host(v) for n, v in self.exp_avg.items()})
        state.update({f"exp_avg_sq.{n}": _host(v) for n, v in self.exp_avg_sq.items()})
        return state

    def _buffers(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


def _host(array) -> np.ndarray:
    get = getattr(array, "get", None)
    return np.asarray(get() if callable(get) else array)


SERVER_OPTIMIZERS = {"fedavg": ServerOptimizer, "fedavgm": FedAvgM, "fedadam": FedAdam}
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01}


def build_server_optimizer(name: str, lr: float | None = None, momentum: float = 0.9) -> ServerOptimizer:
    """`fedavg`, `fedavgm` (server momentum) or `fedadam`; lr None takes the method's usual default."""
    key = name.strip().lower()
    if key not in SERVER_OPTIMIZERS:
        raise ConfigError(f"unknown server optimiser '{name}' (choose {', '.join(SERVER_OPTIMIZERS)})")
    lr = DEFAULT_SERVER_LR[key] if lr is None else lr
    if key == "fedavgm":
        return FedAvgM(lr=lr, momentum=momentum)
    return SERVER_OPTIMIZERS[key](lr=lr)


# ----------------------------------------------------------------------------------------- stop rules

@dataclass
class StopRules:
    """When the federation ends: converged weights, stalled validation loss, or the round budget.

    eps: stop when ||w_{r+1} - w_r|| / ||w_r|| < eps (0 disables). patience_rounds/delta: stop when the
    validation loss has not improved by more than delta for that many rounds (0 disables). max_rounds: budget.
    warmup_rounds: neither rule fires in the first rounds, and their stale rounds do not count towards the
    patience: early on the validation loss can sit on the all-background plateau while F1 climbs (one demo
    seed stopped at round 8 with validation F1 rising from 0.12 to 0.39).
    """

    max_rounds: int = 20
    eps: float = 0.0
    patience_rounds: int = 0
    delta: float = 0.0
    warmup_rounds: int = 0
    best_val_loss: float = math.inf
    rounds_since_best: int = 0
    fired: str | None = None  # "norm", "val_loss" or "budget" once a rule has fired

    def __post_init__(self):
        self.max_rounds = check_number("rounds", self.max_rounds)
        check_fields(self, ("eps", "patience_rounds", "delta", "warmup_rounds"))

    def check(self, round_number: int, norm_difference: float | None, val_loss: float | None) -> str | None:
        """Record finished round `round_number` (1-based); the rule that fires, as a sentence, or None."""
        if val_loss is not None and math.isfinite(val_loss):
            if val_loss < self.best_val_loss - self.delta:
                self.best_val_loss = val_loss
                self.rounds_since_best = 0
            elif round_number > self.warmup_rounds:
                self.rounds_since_best += 1
        self.fired = None
        if round_number <= self.warmup_rounds:
            return f"round budget of {self.max_rounds} spent" if self._budget(round_number) else None
        if self.eps > 0 and norm_difference is not None and norm_difference < self.eps:
            self.fired = "norm"
            return (f"converged: relative norm difference {norm_difference:.3g} < eps {self.eps:g} "
                    f"after round {round_number}")
        if self.patience_rounds > 0 and self.rounds_since_best >= self.patience_rounds:
            self.fired = "val_loss"
            return (f"validation loss has not improved by more than {self.delta:g} for "
                    f"{self.rounds_since_best} round(s) (best {self.best_val_loss:.4f})")
        if self._budget(round_number):
            return f"round budget of {self.max_rounds} spent"
        return None

    def _budget(self, round_number: int) -> bool:
        if round_number >= self.max_rounds:
            self.fired = "budget"
            return True
        return False

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"best_val_loss": np.asarray(self.best_val_loss, dtype=np.float64),
                "rounds_since_best": np.asarray(self.rounds_since_best, dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            self.best_val_loss = float(np.asarray(state["best_val_loss"]))
            self.rounds_since_best = int(np.asarray(state["rounds_since_best"]))
        except KeyError as exc:
            raise CheckpointError(f"stop-rule state lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"stop-rule state is malformed ({exc})") from None
        if math.isnan(self.best_val_loss) or self.rounds_since_best < 0:
            raise CheckpointError("stop-rule state is malformed (NaN best loss or negative round count)")
