"""Who takes part in a round and how the in-process runner runs them (the worker and Flower runners are in
nfed.federation.worker and nfed.federation.flower_transport)."""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from nfed.common.errors import one_line
from nfed.common.progress import progress
from nfed.federation.client import ClientOutcome, ClientResult, ClientTask, clean_metrics

TrainFn = Callable[..., ClientResult]


def select_clients(districts: Sequence[str], fraction: float, seed: int, round_number: int) -> list[str]:
    """The districts taking part in a round: all, or a seeded random fraction (at least one)."""
    if fraction >= 1.0:
        return list(districts)
    count = max(1, math.ceil(fraction * len(districts)))
    rng = np.random.default_rng([int(seed), int(round_number)])
    chosen = set(rng.choice(len(districts), size=count, replace=False).tolist())
    return [name for i, name in enumerate(districts) if i in chosen]


class SequentialRunner:
    """Runs the clients one after the other in this process; speeds turn their times into simulated times.

    With a deadline, a client whose simulated time (its compute time / its relative speed) exceeds the
    deadline is late and left out of the round, so the policy is exercised without real slow machines.
    """

    def __init__(self, train_fn: TrainFn | None = None, speeds: Mapping[str, float] | None = None,
                 show_progress: bool = False):
        if train_fn is None:
            from nfed.federation.client import train_round as train_fn
        self.train_fn = train_fn
        self.speeds = dict(speeds or {})
        self.show_progress = show_progress

    def run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None) -> list[ClientOutcome]:
        outcomes = []
        label = f"round {tasks[0].setup.get('round', '?')}" if tasks else ""
        for task in progress(tasks, label=label, enabled=self.show_progress):
            started = time.perf_counter()
            try:
                feedback = {"residual": task.residual} if task.residual is not None else {}   # int8-ef
                result = self.train_fn(task.start_weights(global_weights), task.setup, task.pack_path,
                                       optimizer_state=task.optimizer_state, env=task.env, **feedback)
            except Exception as exc:  # a crashing client is logged and skipped, the round goes on
                outcomes.append(ClientOutcome(task.district, "failed", time.perf_counter() - started,
                                              reason=one_line(exc)))
                continue
            seconds = clean_metrics(result.metrics).get("wall_time_s", time.perf_counter() - started)
            simulated = seconds / self.speeds.get(task.district, 1.0)
            status = "late" if deadline is not None and simulated > deadline else "ok"
            outcomes.append(ClientOutcome(task.district, status, seconds, simulated, result))
        return outcomes

