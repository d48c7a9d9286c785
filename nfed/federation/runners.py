"""Who takes part in a round, the interface a round's clients are run through (Runner), and the in-process runner.

The runners: SequentialRunner (here: in turn, in this process, simulated speeds), nfed.federation.worker's
WorkerRunner (a fresh subprocess per client and round, killed at a real deadline: `nfed federate --workers`),
nfed.federation.district_jobs' PoolRunner (a pool of long-lived worker processes shared with the study's other
columns: the demo) and nfed.federation.flower.transport's FlowerClients (one SuperNode per district)."""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from nfed.common.errors import one_line
from nfed.common.progress import progress
from nfed.federation.client import ClientOutcome, ClientResult, ClientTask, clean_metrics

TrainFn = Callable[..., ClientResult]


@runtime_checkable
class Runner(Protocol):
    """Runs a round's client tasks from the global weights: one outcome per task (ok, late or failed), the
    deadline applied as the transport can (simulated, killed, or not waited for)."""

    def run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None) -> list[ClientOutcome]: ...


@runtime_checkable
class SecureRunner(Runner, Protocol):
    """A runner whose transport sums the updates so that the server sees only the sum (Flower's SecAgg+): the
    outcomes and the revealed aggregate (nfed.federation.privacy.SecureAggregate)."""

    def run_secure(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None): ...


@runtime_checkable
class NodeRunner(Runner, Protocol):
    """A runner over nodes that can be refused before any task reaches them (Flower's SuperNodes), and that may
    stream replies, encode the broadcast itself and leave each district's local tensors on its node."""

    streams: bool               # hands each reply to the round's RoundStream as it arrives (run_streaming)
    encodes_broadcast: bool     # takes the float32 model and applies --broadcast itself
    bytes_down: int | None      # bytes of the last weights message it sent (None: not known)

    @property
    def refused_nodes(self) -> Mapping[object, str]: ...   # node -> why it was left out of the last round

    @property
    def keeps_local_state(self) -> bool: ...   # a district's BatchNorm (fedbn / silobn) stays on its node


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
        label = f"round {tasks[0].setup.round}" if tasks else ""
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

