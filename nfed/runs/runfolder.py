"""A federated run's folder on disk: its layout, the round history, the run's record, the client states.

Layout (written by nfed.federation, in-process or over Flower; read by the report and `nfed status`):
    RUN/global.h5            global weights after the last finished round (+ server optimiser, stop-rule state)
    RUN/best.h5              global weights of the best round so far (lowest mean validation loss)
    RUN/rounds.jsonl         one JSON line per finished round
    RUN/summary.json         how the run ended: rounds, best round, the stop rule that fired, steps per client
    RUN/status.json          running / finished / failed (with the one-line reason), last round (nfed.runs.runstatus)
    RUN/federated.csv        the best global model on every district's test split (nfed.runs.results)
    RUN/client_state/        per-client state (<district>.r<round>.h5): optimiser state with --client-state keep,
                             the district's own BatchNorm tensors under --norm-policy fedbn / silobn
    RUN/work/                worker task/result files (--workers), removed after each round
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from nfed.common import strict_json
from nfed.common.atomic import write_text_atomic
from nfed.common.errors import CheckpointError, ConfigError, DataError, NfedError, one_line
from nfed.common.names import child_path
from nfed.common.paths import read_own_text, refuse_link
from nfed.model.checkpoint import load_checkpoint
from nfed.runs.runlock import held_folder
from nfed.runs.runstatus import write_status

CHECKPOINT_NAME = "global.h5"
BEST_NAME = "best.h5"
ROUNDS_NAME = "rounds.jsonl"
SUMMARY_NAME = "summary.json"
RESULTS_NAME = "federated.csv"
WORK_NAME = "work"
CLIENT_STATE_NAME = "client_state"
RUN_FILES = (CHECKPOINT_NAME, ROUNDS_NAME, RESULTS_NAME)


# ------------------------------------------------------------------------------------------ client states

def state_file(run_dir: Path, district: str, round_number: int) -> Path:
    return child_path(run_dir / CLIENT_STATE_NAME, district, f".r{round_number:04d}.h5")


def _client_state_files(run_dir: Path, district: str) -> list[tuple[int, Path]]:
    folder = run_dir / CLIENT_STATE_NAME
    found = []
    if folder.is_dir():
        pattern = re.compile(re.escape(district) + r"\.r(\d{4,})\.h5$")
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_state(run_dir: Path, district: str, before_round: int):
    """The district's state checkpoint of its last round before `before_round` (None: it has none), loaded once
    for what a round needs of it (optimiser state, own BatchNorm tensors, error-feedback residual)."""
    candidates = [(r, p) for r, p in _client_state_files(run_dir, district) if r < before_round]
    if not candidates:
        return None
    refuse_link(candidates[-1][1])
    return load_checkpoint(candidates[-1][1])


def client_local_state(run_dir: Path, district: str, before_round: int) -> dict | None:
    """The district's own BatchNorm tensors (a norm policy's local part) after its last round before
    `before_round`; None when it has none (it starts from the global model's)."""
    state = latest_state(run_dir, district, before_round)
    return (state.model_state or None) if state is not None else None


RESIDUAL_PREFIX = "residual."   # int8-ef's error feedback beside a client state's optimiser state


def residual_extra(residual: Mapping[str, object] | None) -> dict:
    """A client's error-feedback residual as a state checkpoint's extra arrays."""
    return {RESIDUAL_PREFIX + name: value for name, value in (residual or {}).items()}


def client_residual(run_dir: Path, district: str, before_round: int) -> dict | None:
    """The district's error-feedback residual (--compress int8-ef) after its last round before `before_round`;
    None when it has none (it starts from zero)."""
    return residual_of(latest_state(run_dir, district, before_round))


def residual_of(state) -> dict | None:
    """The error-feedback residual kept in a loaded client state (None: none, or no state)."""
    if state is None:
        return None
    residual = {k[len(RESIDUAL_PREFIX):]: v for k, v in (state.extra or {}).items() if k.startswith(RESIDUAL_PREFIX)}
    return residual or None


def prune_client_states(run_dir: Path, districts: Sequence[str], finished_round: int, keep_round: int = 0) -> None:
    """Keep, per district, only the newest state of a finished round, and the newest up to `keep_round` (the best
    round's, which scoring it needs); states of unfinished rounds are dropped."""
    for district in districts:
        files = _client_state_files(run_dir, district)
        kept = {max((r for r, _ in files if r <= last), default=None) for last in (finished_round, keep_round)}
        for r, path in files:
            if r not in kept:
                path.unlink(missing_ok=True)


def clear_run_folder(run_dir: Path) -> None:
    """Empty a used folder for a fresh run: no other run's client state, results or history is picked up."""
    shutil.rmtree(run_dir / CLIENT_STATE_NAME, ignore_errors=True)
    for name in (RESULTS_NAME, BEST_NAME, SUMMARY_NAME):
        (run_dir / name).unlink(missing_ok=True)
    write_rounds(run_dir / ROUNDS_NAME, [])


# ------------------------------------------------------------------------------------------ round history

def read_rounds(path: Path) -> list[dict]:
    """The records of RUN/rounds.jsonl (DataError naming the line when one is not JSON, or the file when it is
    a link: a resume reads its own history, not a file elsewhere)."""
    if not path.is_file() and not path.is_symlink():
        return []
    records = []
    for number, line in enumerate(read_own_text(path).splitlines(), start=1):
        if line.strip():
            try:
                record = strict_json.loads(line)
            except ValueError:
                raise DataError(f"{path}: line {number} is not valid JSON") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} is not a round record (a JSON object)")
            records.append(record)
    return records


def rounds_text(records: list[dict]) -> str:
    """RUN/rounds.jsonl's text for `records` (strict JSON, one sorted record per line)."""
    return "".join(strict_json.dumps(r, sort_keys=True) + "\n" for r in records)


def rounds_digest(records: list[dict]) -> str:
    """Fingerprint of the round history, kept in global.h5 so a resume notices a deleted or edited history."""
    return "sha256:" + hashlib.sha256(rounds_text(records).encode("utf-8")).hexdigest()


def write_rounds(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, rounds_text(records))



# ------------------------------------------------------------------------------------------ the run's record

def client_work(records: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    """district -> local epochs and optimiser steps its client took in the rounds whose update was averaged."""
    work: dict[str, dict[str, int]] = {}
    for record in records:
        for district in record.get("answered", []):
            entry = record["clients"].get(district, {})
            totals = work.setdefault(district, {"epochs_run": 0, "steps": 0})
            totals["epochs_run"] += int(entry.get("epochs", 0) or 0)
            totals["steps"] += int(entry.get("steps", 0) or 0)
    return work


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A resume needs a checkpoint; a fresh run needs a folder without a run's results, or `overwrite`. What
    the run reads back or writes into may not be a link (it would lead out of the run folder)."""
    for name in (CHECKPOINT_NAME, CLIENT_STATE_NAME, WORK_NAME):
        refuse_link(run_dir / name)
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"{run_dir / CHECKPOINT_NAME}: nothing to resume (no checkpoint in the run "
                                  "folder)")
        return
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{run_dir}: holds a federated run ({', '.join(existing)}); --resume continues it, "
                          "--overwrite replaces it")


def failure_reason(exc: BaseException) -> str:
    if type(exc).__name__ == "Terminated":
        return "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):   # Flower's ServerApp exits so when its SuperLink stops or `flwr stop`
        return f"stopped from outside (exit status {exc.code}: the SuperLink stopped, or flwr stop)"
    return one_line(exc)


class RunRecorder:
    """Keeps RUN/status.json current for one run: running after each round, then finished or failed."""

    def __init__(self, run_dir: Path, rounds: int, round_number: int = 0):
        self.run_dir = run_dir
        self.rounds = rounds
        self.round = round_number
        self.best_round: int | None = None
        self.stop_reason: str | None = None
        self.problems: dict | None = None   # the last round's: district or node -> why it is not in the average

    def running(self, round_number: int, *, best_round: int | None = None, stop_reason: str | None = None,
                problems: dict | None = None) -> None:
        self.round, self.best_round, self.stop_reason = round_number, best_round or None, stop_reason
        self.problems = problems
        self._write("running")

    def finished(self, result) -> None:
        """`result`: the run's FederationResult (its rounds, best round and stop reason)."""
        self.round, self.best_round, self.stop_reason = len(result.rounds), result.best_round, result.stop_reason
        if result.rounds and isinstance(result.rounds[-1].get("round"), int):
            self.round = result.rounds[-1]["round"]
        self._write("finished")

    def failed(self, exc: BaseException) -> None:
        self._write("failed", failure_reason(exc))

    def _write(self, state: str, reason: str | None = None) -> None:
        write_status(self.run_dir, state, round_number=self.round, rounds=self.rounds, reason=reason,
                     stop_reason=self.stop_reason, best_round=self.best_round, problems=self.problems)


@contextlib.contextmanager
def recorded_run(run_dir: str | Path, *, resume: bool, overwrite: bool, rounds: int,
                 echo: Callable[[str], None] | None = None) -> Iterator[RunRecorder]:
    """Hold the run folder (lock), check once that it may be written, and keep RUN/status.json for the run inside:
    running now, failed with the one-line reason if the block raises. The one owner of a run's folder: the
    recorder it yields is handed on to whatever else writes the run (nfed.federation.server.federate's `held`).

    The folder checks come first, so a refused run never touches another run's status; a run that fails after
    them leaves its status (failed, and why) for `nfed status`. A stale lock (a run that did not end cleanly)
    is taken over and said with `echo`."""
    run_dir = Path(run_dir)
    with held_folder(run_dir) as lock:
        check_run_folder(run_dir, resume, overwrite)
        if lock.stale and echo is not None:
            echo(f"note: the previous run in {run_dir} did not end cleanly ({lock.stale}); its lock was stale")
        recorder = RunRecorder(run_dir, rounds, finished_rounds(run_dir) if resume else 0)
        try:
            recorder.running(recorder.round)
            yield recorder
        except BaseException as exc:
            with contextlib.suppress(Exception):   # the original error matters more than a failed status write
                recorder.failed(exc)
            raise


def finished_rounds(run_dir: Path) -> int:
    """Rounds on record in RUN/rounds.jsonl (0 when it cannot be read: the resume will say why)."""
    try:
        return len(read_rounds(run_dir / ROUNDS_NAME))
    except NfedError:
        return 0

