"""Server optimisers: how the clients' average becomes the next global model (FedAvg, FedAvgM, FedAdam).

They move only the trainable parameters and take the plain average for BatchNorm running statistics (a momentum
or Adam step on a running variance could make it negative). Their state is keyed by parameter name, so the
federation checkpoints and resumes it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from nfed.common.backend import array_module
from nfed.common.errors import CheckpointError, ConfigError
from nfed.common.validate import check_number
from nfed.federation.aggregator import is_statistic


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
