"""District jobs (a local or personalised training, a federated client's round or evaluation) run by worker
processes.

Why processes: at the demo's size (w6, 64 px tiles, batch 8) one district's step is too small for a second
thread to help much, while two districts at once, one thread each, keep both cores busy. A worker is a
`python -m nfed.federation.district_jobs` process that lives as long as its pool, reads one JSON task per line on stdin
and answers one JSON line on stdout (nothing is pickled across the pipe; weights travel as HDF5 checkpoints);
it dies with its parent. Results come back in task order whatever order the workers finish in; the arithmetic
per district is the in-process one (only the number of threads summing a product differs, so the last float
digits can).
"""
from __future__ import annotations

import math
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from nfed.common import strict_json
from nfed.common.errors import TrainingError
from nfed.common.memory import worker_count
from nfed.core.functions.parallel import ENV_THREADS, usable_cpus
from nfed.federation.worker import THREAD_VARIABLES as WORKER_THREAD_VARIABLES
from nfed.training.environment import RunEnvironment, default_environment

FLOAT_KEYS = ("precision", "recall", "f1", "iou", "loss", "best_val_loss")   # None in JSON -> NaN again
THREAD_VARIABLES = (ENV_THREADS, *WORKER_THREAD_VARIABLES)   # nfed's own pool and the BLAS libraries'


def make_task(kind: str, pack: str | Path, out_dir: str | Path, config, weights: str | Path | None = None, *,
              env: RunEnvironment | None = None) -> dict:
    """One district's column job: `kind` local (from scratch) or personalise (from the checkpoint `weights`),
    in the run environment `env` (None: the CPU at the precision in force)."""
    if kind not in ("local", "personalise"):
        raise ValueError(f"unknown column job kind {kind!r}")
    return {"kind": kind, "pack": str(pack), "out": str(out_dir), "config": config.to_dict(),
            "weights": str(weights) if weights is not None else None, "env": _env_entry(env)}


def _env_entry(env: RunEnvironment | None) -> dict:
    """A task's environment, explicit: a worker process does not rely on what it inherited."""
    return (env or default_environment()).to_dict()


def run_task(task: Mapping, weights_cache: dict) -> dict:
    """Do one task; returns its answer (a results row, or a client round's sample count and metrics)."""
    from nfed.federation.client import evaluate_weights, train_round
    from nfed.federation.round_setup import RoundSetup
    from nfed.model.checkpoint import load_checkpoint, save_checkpoint
    from nfed.training.study import local_states_of, personalise_district, train_district
    from nfed.training.trainer import TrainConfig

    env = RunEnvironment.from_dict(task["env"])
    if task["kind"] == "local":
        return {"row": train_district(task["pack"], task["out"], TrainConfig.from_dict(task["config"]), env=env,
                                      quiet=True)}
    if task["weights"] not in weights_cache:
        weights_cache.clear()
        checkpoint = load_checkpoint(task["weights"])
        local = local_states_of(checkpoint, task["weights"])
        weights_cache[task["weights"]] = (checkpoint.model_state, local)
    weights, local_states = weights_cache[task["weights"]]
    residual = None
    if task.get("local_state"):   # the district's own BatchNorm tensors (a norm policy), its int8-ef residual
        from nfed.federation.norm_policy import merge
        from nfed.federation.worker import update_of

        state = load_checkpoint(task["local_state"])
        weights = merge(weights, state.model_state)
        residual = update_of({}, state.extra)[1]
    if task["kind"] == "personalise":
        return {"row": personalise_district(weights, task["pack"], task["out"], TrainConfig.from_dict(task["config"]),
                                            env=env, quiet=True, source=task["weights"], local_states=local_states)}
    if task["kind"] == "evaluate":
        return {"metrics": evaluate_weights(weights, RoundSetup.from_dict(task["setup"]), task["pack"],
                                            split=task["split"], env=env)}
    from nfed.federation.worker import result_extra, result_manifest

    result = train_round(weights, RoundSetup.from_dict(task["setup"]), task["pack"], env=env, residual=residual)
    save_checkpoint(task["result"], result.weights, extra=result_extra(result))
    return {"num_samples": int(result.num_samples), "metrics": result.metrics, **result_manifest(result)}


def worker_pool(jobs: int, districts: int, *, say: bool = True):
    """A WorkerPool of `jobs` processes for `districts` districts, or None (work in this process) for one: use
    with `with`. Capped by worker_count (no idle worker, no more than the memory holds), said unless not `say`."""
    import contextlib

    count = worker_count(jobs, districts, say=say)
    return WorkerPool(count) if count > 1 else contextlib.nullcontext(None)


def run_tasks(tasks: Sequence[Mapping], pool: "WorkerPool | None",
              on_done: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every column task's row, in task order, trained on the pool's workers (in this process when None).
    `on_done` sees each row as it arrives. The first failure is raised (one line naming the district)."""
    rows: list[dict | None] = [None] * len(tasks)
    if pool is None:
        cache: dict = {}
        for index, task in enumerate(tasks):
            rows[index] = run_task(task, cache)["row"]
            on_done(rows[index])
        return rows
    for index, answer in pool.map(tasks):
        if "error" in answer:
            raise TrainingError(f"{_where(tasks[index])}: {answer['error']}")
        rows[index] = _row(answer["row"])
        on_done(rows[index])
    return rows


def _where(task: Mapping) -> str:
    return f"{Path(task['pack']).name} ({task['kind']})"


def _row(row: dict) -> dict:
    for key in FLOAT_KEYS:
        if key in row and row[key] is None:
            row[key] = math.nan
    return row


class WorkerPool:
    """`count` worker processes, started once and reused for every `map` until `close`: any district job (a local
    or personalised training, a client's round or evaluation through PoolRunner), one JSON line each way."""

    def __init__(self, count: int):
        threads = str(max(1, usable_cpus() // count))
        self.env = {**os.environ, **{name: threads for name in THREAD_VARIABLES}}
        self.processes = [self._start() for _ in range(count)]

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "nfed.federation.district_jobs", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, text=True, bufsize=1)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)   # interrupted or failed: do not wait for the tasks in flight

    def map(self, tasks: Sequence[Mapping]) -> Iterator[tuple[int, dict]]:
        """(task index, answer) as each task ends; a worker that dies answers {"error": ...} and is replaced."""
        pending = list(enumerate(tasks))
        busy: dict[int, int] = {}   # slot -> task index
        selector = selectors.DefaultSelector()
        try:
            for slot in range(len(self.processes)):
                self._give(slot, pending, busy, selector)
            while busy:
                for key, _ in selector.select():
                    slot = key.data
                    process = self.processes[slot]
                    line = process.stdout.readline()
                    selector.unregister(process.stdout)
                    index = busy.pop(slot)
                    if line:
                        answer = strict_json.loads(line)
                    else:
                        answer = {"error": f"the worker process ended without an answer (exit code "
                                           f"{process.wait()})"}
                        self.processes[slot] = self._start()
                    self._give(slot, pending, busy, selector)
                    yield index, answer
        finally:
            selector.close()

    def _give(self, slot: int, pending: list, busy: dict, selector) -> None:
        if pending:
            index, task = pending.pop(0)
            process = self.processes[slot]
            busy[slot] = index
            selector.register(process.stdout, selectors.EVENT_READ, slot)
            process.stdin.write(strict_json.dumps(task) + "\n")
            process.stdin.flush()

    def close(self, kill: bool = False) -> None:
        for process in self.processes:
            if kill:
                process.kill()
            try:
                process.stdin.close()
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


class PoolRunner:
    """A federation Runner and evaluation function (nfed.federation.server's `runner=` and `evaluate_fn=`) whose
    clients train and evaluate on a WorkerPool: long-lived processes started once and shared with the study's
    other columns (the demo), unlike worker.WorkerRunner's fresh process per client and round killed at a real
    deadline.

    Each global model is written once (WORK/global-N.h5): a round's validation and the next round's training
    read the same file, which stays until other weights come or the runner closes; every client's weights come
    back as a checkpoint. Like SequentialRunner, a client whose compute time exceeds the deadline is late (nothing is
    killed: the clients are this machine's own processes), and a crashing client is failed while the round
    goes on. The first `evaluate` call for given weights and split evaluates every district of `packs` at once;
    the others are answered from that, except a call with a district's own BatchNorm (`local_state`, a norm policy
    other than shared), evaluated on its own. Optimiser states kept across rounds (--client-state keep) are not
    supported here."""

    def __init__(self, pool: WorkerPool, work_dir: str | Path, packs: Mapping[str, str | Path]):
        self.pool = pool
        self.work_dir = Path(work_dir)
        self.packs = {str(path): district for district, path in packs.items()}
        self._files = 0
        self._evaluated: tuple | None = None   # (weights, split, pack path -> metrics or error)
        self._written: tuple | None = None     # (weights, the file they were written to)

    def __enter__(self) -> "PoolRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the file of the last weights."""
        if self._written is not None:
            self._written[1].unlink(missing_ok=True)
            self._written = None

    def _weights_file(self, weights) -> Path:
        """The file the workers read these weights from, written on the first call for this weights object."""
        from nfed.model.checkpoint import save_checkpoint

        if self._written is not None and self._written[0] is weights and self._written[1].is_file():
            return self._written[1]
        self.close()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._files += 1   # a new file name per weights: workers cache the weights by path
        path = save_checkpoint(self.work_dir / f"global-{self._files}.h5", weights)
        self._written = (weights, path)
        return path

    def run(self, global_weights, tasks, deadline: float | None):
        from nfed.federation.client import ClientOutcome, ClientResult, clean_metrics
        from nfed.federation.worker import update_of
        from nfed.model.checkpoint import load_checkpoint

        if any(task.optimizer_state is not None for task in tasks):
            raise TrainingError("worker processes start each round's optimiser afresh (--client-state reset)")
        weights_path = self._weights_file(global_weights)
        jobs = [{"kind": "round", "pack": str(task.pack_path), "setup": task.setup.to_dict(),
                 "weights": str(weights_path), "result": str(self.work_dir / f"client-{index}.h5"),
                 "env": _env_entry(task.env),
                 "local_state": self._local_file(task.local_state, f"client-{index}.local.h5", task.residual)}
                for index, task in enumerate(tasks)]
        outcomes = [None] * len(tasks)
        for index, answer in self.pool.map(jobs):
            task = tasks[index]
            if "error" in answer:
                outcomes[index] = ClientOutcome(task.district, "failed", reason=answer["error"])
                continue
            metrics = clean_metrics(answer.get("metrics"))
            result_path = Path(jobs[index]["result"])
            checkpoint = load_checkpoint(result_path)
            result = ClientResult(checkpoint.model_state, int(answer["num_samples"]), metrics, None,
                                  *update_of(answer, checkpoint.extra))
            result_path.unlink()
            if jobs[index]["local_state"]:
                Path(jobs[index]["local_state"]).unlink()
            seconds = float(metrics.get("wall_time_s", 0.0))
            status = "late" if deadline is not None and seconds > deadline else "ok"
            outcomes[index] = ClientOutcome(task.district, status, seconds, seconds, result)
        return outcomes

    def _local_file(self, local_state: Mapping | None, name: str, residual: Mapping | None = None) -> str | None:
        """The file a worker reads a district's own local tensors and int8-ef residual from (None: it has none)."""
        from nfed.model.checkpoint import save_checkpoint
        from nfed.runs.runfolder import residual_extra

        if not local_state and not residual:
            return None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return str(save_checkpoint(self.work_dir / name, local_state or {}, extra=residual_extra(residual)))

    def evaluate(self, weights, setup, pack_path, *, split: str = "val", env: RunEnvironment | None = None,
                 local_state: Mapping | None = None) -> dict:
        if local_state:
            job = {"kind": "evaluate", "pack": str(pack_path), "setup": setup.to_dict(), "split": split,
                   "weights": str(self._weights_file(weights)), "env": _env_entry(env),
                   "local_state": self._local_file(local_state, "evaluate.local.h5")}
            answer = next(iter(self.pool.map([job])))[1]
            Path(job["local_state"]).unlink()
            if "error" in answer:
                raise TrainingError(answer["error"])
            return _row(dict(answer["metrics"]))
        if self._evaluated is None or self._evaluated[0] is not weights or self._evaluated[1] != split:
            self._evaluated = None
            weights_path = self._weights_file(weights)
            jobs = [{"kind": "evaluate", "pack": pack, "setup": setup.to_dict(), "weights": str(weights_path),
                     "split": split, "env": _env_entry(env)} for pack in self.packs]
            answers = {}
            for index, answer in self.pool.map(jobs):
                answers[jobs[index]["pack"]] = answer
            self._evaluated = (weights, split, answers)
        answer = self._evaluated[2].get(str(pack_path))
        if answer is None:
            raise TrainingError(f"{pack_path}: not one of the packs this runner evaluates")
        if "error" in answer:
            raise TrainingError(answer["error"])
        return _row(dict(answer["metrics"]))


def serve(parent_pid: int | None) -> int:
    """Worker loop: one task per stdin line, one answer per stdout line, until stdin closes."""
    from nfed.common.errors import one_line
    from nfed.federation.worker import die_with_parent

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle: it stops the pool
    cache: dict = {}
    for line in sys.stdin:
        try:
            answer = run_task(strict_json.loads(line), cache)
        except Exception as exc:  # the parent reports it as the district's one-line failure
            answer = {"error": one_line(exc)}
        sys.stdout.write(strict_json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]) if len(sys.argv) > 1 else None))
