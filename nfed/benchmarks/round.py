"""Seconds per federated round split into train / aggregate / evaluate / other (`nfed bench round`).

The real in-process Federation runs unchanged; only the hooks it already takes are wrapped, so the timing
sees what `nfed federate` and `nfed demo` do:
- train: the runner's run() (the clients' local training, worker transport included with --workers);
- aggregate: from the runner's return to the round's first validation (robust filters, FedAvg, the server
  optimiser step, the norm difference and the round record);
- evaluate: from the first to the last validation of the global model on every district (evaluate_fn);
- other: the rest of the round, i.e. client selection and tasks before training, and after validation the best-
  model checkpoint, rounds.jsonl and global.h5. A round ends when the Federation reports its progress
  (its recorder's running(), the last thing of a round).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

PARTS = ("train", "aggregate", "evaluate", "other")


class RoundClock:
    """Time marks of every round, taken by the wrapped runner, evaluate_fn and recorder."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.rounds: list[dict] = []
        self._last_end = now()
        self._current: dict = {}

    def mark(self, name: str) -> None:
        self._current[name] = self.now()

    def count(self, name: str, number: int) -> None:
        self._current[name] = self._current.get(name, 0) + number

    def timed_runner(self, runner):
        return _TimedRunner(runner, self)

    def timed_evaluate(self, evaluate_fn):
        def evaluate(*args, **kwargs):
            self._current.setdefault("eval_start", self.now())
            try:
                return evaluate_fn(*args, **kwargs)
            finally:
                self.mark("eval_end")
                self.count("evaluations", 1)
        return evaluate

    def running(self, round_number: int, **_facts) -> None:
        """The Federation's progress report after each round (the RunRecorder interface): the round ends."""
        end = self.now()
        marks, self._current = self._current, {}
        start, self._last_end = self._last_end, end
        train_start = marks.get("train_start", start)
        train_end = marks.get("train_end", train_start)
        eval_start = marks.get("eval_start", train_end)
        eval_end = marks.get("eval_end", eval_start)
        self.rounds.append({
            "round": round_number, "total": end - start, "train": train_end - train_start,
            "aggregate": eval_start - train_end, "evaluate": eval_end - eval_start,
            "other": (train_start - start) + (end - eval_end),
            "clients": marks.get("clients", 0), "evaluations": marks.get("evaluations", 0)})


class _TimedRunner:
    """Delegates to the federation's runner and marks the start and end of the clients' training."""

    def __init__(self, runner, clock: RoundClock):
        self.runner = runner
        self.clock = clock

    def run(self, global_weights, tasks, deadline):
        self.clock.mark("train_start")
        try:
            return self.runner.run(global_weights, tasks, deadline)
        finally:
            self.clock.mark("train_end")
            self.clock.count("clients", len(tasks))


def time_rounds(packs: Mapping[str, Path], run_dir: Path, train_config, *, rounds: int, warmup: int,
                workers: int = 0, jobs: int = 0, local_epochs: int = 1, seed: int = 0) -> dict:
    """Run warmup + rounds FedAvg rounds of `local_epochs` (no stop rule fires before the budget) in
    `run_dir`, the clients in turn, in `workers` processes (one per client) or on a pool of `jobs` processes
    (nfed demo's); returns the timed rounds (after the warm-up ones) and the federation's own round seconds."""
    from nfed.federation.client import evaluate_weights
    from nfed.federation.district_jobs import PoolRunner, worker_pool
    from nfed.federation.config import FederationConfig
    from nfed.federation.runners import SequentialRunner
    from nfed.federation.server import Federation
    from nfed.runs.runfolder import read_rounds, ROUNDS_NAME
    from nfed.federation.worker import WorkerRunner

    config = FederationConfig(rounds=warmup + rounds, local_epochs=local_epochs, workers=workers, seed=seed)
    clock = RoundClock()
    with worker_pool(jobs) as pool:
        if pool is not None:
            runner = PoolRunner(pool, run_dir / "work", packs)
            evaluate_fn = runner.evaluate
        else:
            runner = WorkerRunner(workers, run_dir / "work") if workers > 1 else SequentialRunner()
            evaluate_fn = evaluate_weights
        federation = Federation(packs, run_dir, train_config, config, runner=clock.timed_runner(runner),
                                evaluate_fn=clock.timed_evaluate(evaluate_fn))
        federation.recorder = clock
        federation.run(overwrite=True)
    recorded = {r["round"]: r.get("seconds") for r in read_rounds(run_dir / ROUNDS_NAME)}
    timed = clock.rounds[warmup:]
    for entry in timed:
        entry["federation_seconds"] = recorded.get(entry["round"])
    return {"per_round": timed, "warmup_per_round": clock.rounds[:warmup]}


def summarise(rounds: list[dict]) -> dict:
    """Median and min seconds of each part and of the whole round over the timed rounds."""
    summary = {}
    for part in PARTS + ("total",):
        values = [r[part] for r in rounds]
        summary[part] = {"median": statistics.median(values), "min": min(values)}
    return summary
