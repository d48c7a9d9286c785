"""Parallel clients in worker subprocesses, with a real wall-clock deadline (`nfed federate --workers N`).

Nothing crosses the process boundary as a pickle: the server writes the global weights (and a client's kept
optimiser state, own BatchNorm tensors and error-feedback residual) as HDF5 checkpoints and the task as JSON; the
worker (`python -m nfed.federation.worker TASK.json`) writes its weights (and a compressed update's arrays, its
residual) as an HDF5 checkpoint and its number of samples, metrics (and the update's manifest) as JSON. A worker still
running at the deadline is killed with its whole process group and its update is left out of the round.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from nfed.common import strict_json
from nfed.common.atomic import write_json_atomic
from nfed.common.errors import CheckpointError, ConfigError, one_line
from nfed.common.memory import worker_count
from nfed.federation.client import ClientOutcome, ClientResult, clean_metrics
from nfed.federation.norm_policy import merge
from nfed.federation.round_setup import RoundSetup
from nfed.model.checkpoint import load_checkpoint, save_checkpoint
from nfed.runs.runfolder import RESIDUAL_PREFIX, residual_extra
from nfed.training.environment import RunEnvironment

DEFAULT_CLIENT = "nfed.federation.client:train_round"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
UPDATE_PREFIX = "update."   # a compressed update's arrays in a worker's result checkpoint


def _client_function(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"client function '{spec}' must be 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)


class WorkerRunner:
    """The Runner of `nfed federate --workers N`: a fresh subprocess per client and round (up to `workers` at a
    time, no more than a round's clients or the memory holds: worker_count, said once), killed with its process
    group when still running at the real wall-clock deadline. Unlike district_jobs.PoolRunner (long-lived pool
    processes, a simulated deadline) nothing outlives the round, and a client may hang or crash its process.

    `gpus` assigns the clients round-robin to cuda:<id> (already done per task by the federation);
    `client_function` names the client's train function as "module:function" (tests use a hanging one).
    """

    def __init__(self, workers: int, work_dir: str | Path, *, gpus: Sequence[int] = (),
                 client_function: str = DEFAULT_CLIENT, poll_s: float = 0.05):
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.work_dir = Path(work_dir)
        self.gpus = tuple(gpus)
        self.client_function = client_function
        self.poll_s = poll_s
        self._said = False

    def _environment(self, workers: int) -> dict:
        env = dict(os.environ)
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in THREAD_VARIABLES:
            env.setdefault(name, threads)
        return env

    def run(self, global_weights, tasks, deadline: float | None):
        round_dir = self.work_dir / f"round-{tasks[0].setup.round if tasks else 0}"
        shutil.rmtree(round_dir, ignore_errors=True)
        round_dir.mkdir(parents=True)
        global_path = save_checkpoint(round_dir / "global.h5", global_weights)
        workers = worker_count(self.workers, len(tasks), option="--workers", say=not self._said)
        self._said = self._said or workers < self.workers
        env = self._environment(workers)
        pending = list(enumerate(tasks))
        running: dict[int, tuple] = {}
        outcomes: dict[int, ClientOutcome] = {}
        started = time.monotonic()
        try:
            while pending or running:
                elapsed = time.monotonic() - started
                if deadline is not None and elapsed >= deadline:
                    for index, (task, process, launched, _) in running.items():
                        _kill(process)
                        outcomes[index] = ClientOutcome(task.district, "late", time.monotonic() - launched,
                                                        reason=f"still running at the {deadline:g} s deadline")
                    running.clear()
                    for index, task in pending:
                        outcomes[index] = ClientOutcome(task.district, "late", 0.0,
                                                        reason=f"not started before the {deadline:g} s deadline")
                    pending.clear()
                    break
                while pending and len(running) < workers:
                    index, task = pending.pop(0)
                    running[index] = self._launch(index, task, round_dir, global_path, env)
                for index in list(running):
                    task, process, launched, files = running[index]
                    if process.poll() is not None:
                        outcomes[index] = self._collect(task, process, time.monotonic() - launched, files)
                        del running[index]
                time.sleep(self.poll_s)
        finally:
            for task, process, _, _ in running.values():
                _kill(process)
            shutil.rmtree(round_dir, ignore_errors=True)
        return [outcomes[i] for i in sorted(outcomes)]

    def _launch(self, index, task, round_dir: Path, global_path: Path, env):
        prefix = round_dir / f"client-{index:03d}"
        files = {"task": prefix.with_suffix(".task.json"), "weights": prefix.with_suffix(".weights.h5"),
                 "result": prefix.with_suffix(".result.json"), "log": prefix.with_suffix(".log"),
                 "state": prefix.with_suffix(".state.h5")}
        state_path = None
        if task.optimizer_state or task.local_state or task.residual:
            state_path = str(save_checkpoint(files["state"], task.local_state or {},
                                             optimizer_state=task.optimizer_state or None,
                                             extra=residual_extra(task.residual)))
        write_json_atomic(files["task"], {
            "district": task.district, "pack": str(task.pack_path), "setup": task.setup.to_dict(),
            "global": str(global_path), "optimizer_state": state_path,
            "env": task.env.to_dict() if task.env is not None else None,
            "client_function": self.client_function, "parent_pid": os.getpid(),
            "result_weights": str(files["weights"]), "result_json": str(files["result"])})
        with open(files["log"], "wb") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "nfed.federation.worker", str(files["task"])],
                                       stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        return task, process, time.monotonic(), files

    def _collect(self, task, process, seconds: float, files):
        """The worker's outcome; anything malformed fails this client only, never the round."""
        try:
            answer = strict_json.loads(files["result"].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tail = _last_line(files["log"])
            return ClientOutcome(task.district, "failed", seconds,
                                 reason=f"worker exited with code {process.returncode}" + (f": {tail}" if tail else ""))
        if not isinstance(answer, dict):
            return ClientOutcome(task.district, "failed", seconds, reason="worker result is not a JSON object")
        if "error" in answer:
            return ClientOutcome(task.district, "failed", seconds, reason=str(answer["error"])[:500])
        num_samples = answer.get("num_samples")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            return ClientOutcome(task.district, "failed", seconds,
                                 reason=f"worker result has no valid num_samples ({str(num_samples)[:40]!r})")
        try:
            checkpoint = load_checkpoint(files["weights"])
        except CheckpointError as exc:
            return ClientOutcome(task.district, "failed", seconds, reason=str(exc))
        result = ClientResult(checkpoint.model_state, num_samples, clean_metrics(answer.get("metrics")),
                              checkpoint.optimizer_state or None, *update_of(answer, checkpoint.extra))
        return ClientOutcome(task.district, "ok", seconds, None, result)


def result_extra(result: ClientResult) -> dict:
    """A client result's compressed update arrays and residual, as its result checkpoint's extra arrays."""
    arrays = result.update["arrays"] if result.update is not None else {}
    return {**{UPDATE_PREFIX + k: v for k, v in arrays.items()}, **residual_extra(result.residual)}


def result_manifest(result: ClientResult) -> dict:
    """The entry of a worker's JSON answer that carries a compressed update's manifest (none without one)."""
    return {"update_manifest": result.update["manifest"]} if result.update is not None else {}


def update_of(answer: dict, extra: dict) -> tuple:
    """(compressed update, residual) of a worker's result files: the payload's arrays and the residual are the
    result checkpoint's extra arrays, the manifest is in its JSON (the server decodes and checks the payload)."""
    residual = {k[len(RESIDUAL_PREFIX):]: v for k, v in extra.items() if k.startswith(RESIDUAL_PREFIX)} or None
    if "update_manifest" not in answer:
        return None, residual
    arrays = {k[len(UPDATE_PREFIX):]: v for k, v in extra.items() if k.startswith(UPDATE_PREFIX)}
    return {"manifest": answer["update_manifest"], "arrays": arrays}, residual


def _kill(process: subprocess.Popen) -> None:
    """Kill the worker and anything it started (it leads its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel kill this worker when the server process dies (Linux PR_SET_PDEATHSIG), and exit now if
    it is already gone: a killed `nfed federate` leaves no worker behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def run_task(task_path: str | Path) -> int:
    """Worker entry point: run one client task file, write its result files; exit status 0 on success."""
    task = json.loads(Path(task_path).read_text(encoding="utf-8"))
    die_with_parent(task.get("parent_pid"))
    try:
        train = _client_function(task.get("client_function", DEFAULT_CLIENT))
        global_weights = load_checkpoint(task["global"]).model_state
        kept = load_checkpoint(task["optimizer_state"]) if task.get("optimizer_state") else None
        state = (kept.optimizer_state or None) if kept is not None else None
        if kept is not None and kept.model_state:   # the district's own BatchNorm tensors (a norm policy)
            global_weights = merge(global_weights, kept.model_state)
        env = RunEnvironment.from_dict(task["env"]) if task.get("env") else None
        _, residual = update_of({}, kept.extra) if kept is not None else (None, None)
        feedback = {"residual": residual} if residual is not None else {}   # int8-ef
        setup = RoundSetup.from_dict(task["setup"])
        result = train(global_weights, setup, task["pack"], optimizer_state=state, env=env, **feedback)
        save_checkpoint(task["result_weights"], result.weights, optimizer_state=result.optimizer_state,
                        extra=result_extra(result))
        write_json_atomic(task["result_json"], {"num_samples": int(result.num_samples), "metrics": result.metrics,
                                                **result_manifest(result)})
        return 0
    except Exception as exc:  # reported to the server as this client's one-line failure
        write_json_atomic(task["result_json"], {"error": one_line(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(run_task(sys.argv[1]))
