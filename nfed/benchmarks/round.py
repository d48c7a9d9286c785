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

The data is made first (or taken from a folder); the rounds then run in a fresh Python process
(nfed.benchmarks.isolated), so its peak resident memory (ru_maxrss of the process, and of its largest worker
with workers > 1) is the federation's alone, not the data generation's.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping

from nfed.benchmarks.isolated import answer, json_worker, peak_rss_mb
from nfed.common.errors import ConfigError

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
    from nfed.federation.config import FederationConfig
    from nfed.federation.district_jobs import PoolRunner, worker_pool
    from nfed.federation.runners import SequentialRunner
    from nfed.federation.server import Federation
    from nfed.federation.worker import WorkerRunner
    from nfed.runs.runfolder import ROUNDS_NAME, read_rounds

    config = FederationConfig(rounds=warmup + rounds, local_epochs=local_epochs, eps=0.0, workers=workers, seed=seed)
    clock = RoundClock()
    with worker_pool(jobs, len(packs)) as pool, ExitStack() as cleanup:
        if pool is not None:
            runner = cleanup.enter_context(PoolRunner(pool, run_dir / "work", packs))
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


def run_round_bench(train_config, *, settings, data: Path | None = None, district_count: int = 25,
                    scale: float | None = None, tile: int = 64, rounds: int = 3, warmup: int = 1, workers: int = 0,
                    jobs: int = 0, local_epochs: int = 1) -> dict:
    """Time `rounds` rounds after `warmup` on the packs in `data`, or on `district_count` synthetic districts
    made in a temporary folder (removed afterwards) at `scale` and `tile` with the data settings of `settings`
    (nfed demo's: data_seed, min_train_tiles, val_tiles, test_tiles). Returns the JSON of `nfed bench round`."""
    scale = settings.scale if scale is None else scale
    if tile % 16:
        raise ConfigError(f"--tile {tile}: must be a multiple of 16 (W-Net pools 4 times)")
    if workers > 1 and jobs > 1:
        raise ConfigError("--workers (a process per client) and --jobs (a pool of processes): give one of them")
    task = {"rounds": rounds, "warmup": warmup, "workers": workers, "jobs": jobs, "local_epochs": local_epochs,
            "train_config": train_config.to_dict()}
    with tempfile.TemporaryDirectory(prefix="nfed-bench-round-") as scratch:
        if data is None:
            data = synthetic_packs(Path(scratch), district_count, scale, tile, settings)
            source = {"districts": district_count, "scale": scale, "tile": tile}
        else:
            from nfed.runs.packs import find_packs

            find_packs(data)   # a missing or empty folder fails here, in one line
            source = {"data": str(data)}
        task.update(packs=str(data), run_dir=str(Path(scratch) / "run"))
        load_before = list(os.getloadavg())
        code = "import sys; from nfed.benchmarks.round import worker_main; worker_main(sys.argv[1])"
        measured = json_worker(code, [json.dumps(task)], "round benchmark")
    return {**source, "width": train_config.width, "batch": train_config.batch_size, "rounds": rounds,
            "warmup": warmup, "workers": workers, "jobs": jobs, "local_epochs": local_epochs,
            "cpu_count": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()), **measured}


def summary_line(result: dict) -> str:
    """One line: median (min) seconds per round and per part, and the peak memory."""
    parts = result["seconds"]
    split = ", ".join(f"{part} {parts[part]['median']:.2f} ({parts[part]['min']:.2f})" for part in PARTS)
    return (f"{result['districts_run']} districts, w {result['width']}, batch {result['batch']}, "
            f"{result['rounds']} rounds after {result['warmup']} warm-up: {parts['total']['median']:.2f} s per round "
            f"(min {parts['total']['min']:.2f}); median (min) s: {split}; peak RSS {result['peak_rss_mb']:.0f} MB"
            + (f" (+ largest worker {result['peak_rss_children_mb']:.0f} MB)" if result["workers"] > 1 else "")
            + f"; load average {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} "
              f"after")


def synthetic_packs(folder: Path, count: int, scale: float, tile: int, settings) -> Path:
    """The first `count` districts of the district table, synthesised and packed under `folder`/packs."""
    from nfed.data.districts import district_names
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise

    names = district_names()
    if count > len(names):
        raise ConfigError(f"--districts {count}: there are {len(names)} districts")
    synthesise(folder / "synth", scale=scale, tile=tile, seed=settings.data_seed, districts=names[:count],
               min_per_district=settings.min_train_tiles, val_tiles=settings.val_tiles,
               test_tiles=settings.test_tiles)
    pack_folder(folder / "synth", folder / "packs", seed=settings.data_seed)
    return folder / "packs"


def worker_main(task_json: str) -> None:
    """Entry point of the benchmark subprocess (prints one JSON object)."""
    from nfed.runs.packs import find_packs
    from nfed.training.trainer import TrainConfig

    task = json.loads(task_json)

    def measure() -> dict:
        packs = find_packs(task["packs"])
        timed = time_rounds(packs, Path(task["run_dir"]), TrainConfig.from_dict(task["train_config"]),
                            rounds=task["rounds"], warmup=task["warmup"], workers=task["workers"],
                            jobs=task.get("jobs", 0), local_epochs=task.get("local_epochs", 1))
        return {"districts_run": len(packs), "seconds": summarise(timed["per_round"]), **timed,
                "peak_rss_mb": peak_rss_mb(), "peak_rss_children_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}

    answer(measure)
