"""In-process orchestration of federated rounds (the study's Figure 1), with deadline, sampling and resume.

Round r: pick the participating districts (seeded by (seed, r)), send them the global weights w_{r-1} and the
round's set-up, run them (in turn with simulated speeds, or in parallel worker subprocesses with a real
deadline), drop late and failed clients, average the responders' updates (FedAvg, then the server optimiser),
evaluate w_r on every district's validation split (federated evaluation, per-district F1 for the study's
Fig. 5), test the stop rules, append the round to RUN/rounds.jsonl and checkpoint RUN/global.h5 atomically.

A late update is never averaged into a later round: each round's aggregator only sees that round's updates.
A round with fewer responders than `min_clients` keeps the previous global weights and says so.

The federated column is the global model of the round with the lowest mean validation loss (when rounds are
evaluated; else the last round's), the server-side twin of a local run's early stopping.

Run folder layout:
    RUN/global.h5            global weights after the last finished round (+ server optimiser, stop-rule state)
    RUN/best.h5              global weights of the best round so far (lowest mean validation loss)
    RUN/rounds.jsonl         one JSON line per finished round
    RUN/summary.json         how the run ended: rounds, best round, the stop rule that fired, steps per client
    RUN/status.json          running / finished / failed (with the one-line reason), last round (nfed.runs.runstatus)
    RUN/federated.csv        the best global model on every district's test split
    RUN/client_state/        per-client optimiser state with --client-state keep (<district>.r<round>.h5)
    RUN/work/                worker task/result files (--workers), removed after each round
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nfed.federation.aggregator import StopRules, build_server_optimizer, relative_norm_difference, trainable, update_problem
from nfed.federation.robust import build_aggregator, cap_sample_counts, registered_samples
from nfed.common import strict_json
from nfed.common.atomic import new_folder, write_json_atomic, write_text_atomic
from nfed.model.checkpoint import checkpoint_kind, load_checkpoint, save_checkpoint
from nfed.federation.client import (DP_CLIP_KEY, ClientOutcome, ClientResult, ClientTask, clean_metrics, make_round_setup,
                     one_line)
from nfed.common.errors import CheckpointError, ConfigError, DataError, NfedError
from nfed.common.progress import progress
from nfed.runs.results import test_facts, write_results_csv
from nfed.runs.runlock import RunLock
from nfed.runs.runstatus import write_status
from nfed.common.validate import check_fields, check_number

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "global.h5"
BEST_NAME = "best.h5"
ROUNDS_NAME = "rounds.jsonl"
SUMMARY_NAME = "summary.json"
RESULTS_NAME = "federated.csv"
RUN_FILES = (CHECKPOINT_NAME, ROUNDS_NAME, RESULTS_NAME)

SPEED_PROFILES = ("uniform", "study")
# Fields that change the arithmetic of the federation: a resumed run must use the values it started with.
RESUME_FIELDS = ("local_epochs", "fraction", "min_clients", "server_opt", "server_lr", "server_momentum",
                 "client_state", "seed", "eps", "patience_rounds", "warmup_rounds", "delta", "aggregator", "trim_beta",
                 "krum_f", "krum_m", "clip_factor", "max_sample_share", "dp_clip", "dp_noise", "dp_delta",
                 "secure_aggregation", "secagg_range", "simulate_attack", "attackers")


@dataclass
class FederationConfig:
    """Options of `nfed federate` that shape the protocol (the model/optimiser set-up is a TrainConfig)."""

    rounds: int = 20
    local_epochs: int = 1
    eps: float = 0.0
    patience_rounds: int = 0
    warmup_rounds: int = 0      # rounds in which no stop rule fires nor counts (see aggregator.StopRules)
    delta: float = 0.0
    deadline: float | None = None
    fraction: float = 1.0
    min_clients: int = 1
    workers: int = 0
    server_opt: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float = 0.9
    client_state: str = "reset"
    client_speeds: dict[str, float] | None = None
    seed: int = 0
    gpus: tuple[int, ...] = ()
    evaluate_rounds: bool = True
    # defences (nfed.federation.robust, nfed.federation.privacy, Flower's SecAgg+) and the testing-only attack simulation
    aggregator: str = "fedavg"
    trim_beta: float = 0.2
    krum_f: int = 1
    krum_m: int = 0
    clip_factor: float = 1.0
    max_sample_share: float = 1.0
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float | None = None
    secure_aggregation: bool = False
    secagg_range: float = 8.0
    simulate_attack: str | None = None
    attackers: int = 0

    def __post_init__(self):
        check_fields(self, ("rounds", "local_epochs", "eps", "patience_rounds", "warmup_rounds", "delta", "deadline",
                            "fraction", "min_clients", "workers", "server_lr", "server_momentum", "seed", "trim_beta",
                            "krum_f", "krum_m", "clip_factor", "max_sample_share", "dp_clip", "dp_noise",
                            "dp_delta", "secagg_range", "attackers"),
                     optional=("deadline", "server_lr", "dp_delta"))
        check_defences(self)
        if self.client_state not in ("reset", "keep"):
            raise ConfigError(f"--client-state must be reset or keep, got {self.client_state}")
        self.gpus = tuple(check_number("gpu", g) for g in self.gpus)
        if self.client_speeds is not None:
            self.client_speeds = {str(k): check_number(f"speed of {k}", v, "client_speed")
                                  for k, v in self.client_speeds.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def check_defences(config: FederationConfig) -> None:
    """Options that exclude each other fail in one line (ConfigError)."""
    from nfed.federation.attacks import ATTACKS
    from nfed.federation.robust import AGGREGATORS

    if config.aggregator not in AGGREGATORS:
        raise ConfigError(f"--aggregator must be one of {', '.join(AGGREGATORS)}, got {config.aggregator}")
    if config.simulate_attack is not None and config.simulate_attack not in ATTACKS:
        raise ConfigError(f"--simulate-attack must be one of {', '.join(ATTACKS)}, got {config.simulate_attack}")
    if (config.simulate_attack is None) != (config.attackers == 0):
        raise ConfigError("--simulate-attack KIND and --attackers N (> 0) go together")
    if config.dp_noise > 0 and config.dp_clip == 0:
        raise ConfigError("--dp-noise needs --dp-clip (the L2 bound each client clips its update to)")
    if config.dp_clip > 0 and config.aggregator != "fedavg":
        raise ConfigError(f"--dp-clip runs DP-FedAvg; it cannot be combined with --aggregator {config.aggregator}")
    if config.secure_aggregation:
        if config.aggregator != "fedavg":
            raise ConfigError(f"secure aggregation hides the individual updates that --aggregator "
                              f"{config.aggregator} needs: use fedavg (clipping moves to the clients: --dp-clip)")
        if config.max_sample_share < 1.0:
            raise ConfigError("with secure aggregation the server never sees one client's weight: "
                              "--max-sample-share cannot apply")
        if config.simulate_attack is not None:
            raise ConfigError("--simulate-attack changes individual updates on the server, which secure "
                              "aggregation hides")


# ------------------------------------------------------------------------------------------ client speeds

def load_client_speeds(spec: str | None, districts: Sequence[str]) -> dict[str, float] | None:
    """Relative client speeds from a named profile (`uniform`, `study`) or a JSON / CSV file district -> speed.

    `study` puts the districts, in table order, into three tiers of hardware (1.0, 0.5, 0.25), like the
    study's mix of faster and slower district machines. Districts missing from a file run at speed 1.
    """
    if spec is None or spec == "":
        return None
    if spec == "uniform":
        return {name: 1.0 for name in districts}
    if spec == "study":
        tiers = (1.0, 0.5, 0.25)
        return {name: tiers[i % 3] for i, name in enumerate(districts)}
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--client-speeds: '{spec}' is neither a profile ({', '.join(SPEED_PROFILES)}) "
                          f"nor an existing JSON/CSV file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = strict_json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("expected an object district -> speed")
            pairs = raw.items()
        else:
            rows = [row for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
            if rows and rows[0][0].strip().lower() == "district":
                rows = rows[1:]
            pairs = [(row[0].strip(), row[1]) for row in rows]
        speeds = {str(name): float(value) for name, value in pairs}
    except (ValueError, IndexError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read client speeds ({exc})") from None
    speeds = {name: check_number(f"{path}: speed of {name}", value, "client_speed") for name, value in speeds.items()}
    unknown = sorted(set(speeds) - set(districts))
    if unknown:
        log.warning("%s: speeds for unknown district(s) ignored: %s", path, ", ".join(unknown))
    return {name: speeds.get(name, 1.0) for name in districts}


# ------------------------------------------------------------------------------------------ client runs

TrainFn = Callable[..., ClientResult]


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
                result = self.train_fn(global_weights, task.setup, task.pack_path,
                                       optimizer_state=task.optimizer_state, device=task.device)
            except Exception as exc:  # a crashing client is logged and skipped, the round goes on
                outcomes.append(ClientOutcome(task.district, "failed", time.perf_counter() - started,
                                              reason=one_line(exc)))
                continue
            seconds = clean_metrics(result.metrics).get("wall_time_s", time.perf_counter() - started)
            simulated = seconds / self.speeds.get(task.district, 1.0)
            status = "late" if deadline is not None and simulated > deadline else "ok"
            outcomes.append(ClientOutcome(task.district, status, seconds, simulated, result))
        return outcomes


# ------------------------------------------------------------------------------------------ run folder

def _state_file(run_dir: Path, district: str, round_number: int) -> Path:
    return run_dir / "client_state" / f"{district}.r{round_number:04d}.h5"


def _client_state_files(run_dir: Path, district: str) -> list[tuple[int, Path]]:
    folder = run_dir / "client_state"
    found = []
    if folder.is_dir():
        pattern = re.compile(re.escape(district) + r"\.r(\d{4,})\.h5$")
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def _latest_client_state(run_dir: Path, district: str, before_round: int) -> dict | None:
    candidates = [(r, p) for r, p in _client_state_files(run_dir, district) if r < before_round]
    if not candidates:
        return None
    return load_checkpoint(candidates[-1][1]).optimizer_state


def _prune_client_states(run_dir: Path, district: str, finished_round: int) -> None:
    """Keep, per district, only the newest state of a finished round (and drop states of unfinished ones)."""
    files = _client_state_files(run_dir, district)
    kept = [r for r, _ in files if r <= finished_round]
    newest = max(kept) if kept else None
    for r, path in files:
        if r != newest:
            path.unlink(missing_ok=True)


def read_rounds(path: Path) -> list[dict]:
    """The records of RUN/rounds.jsonl (DataError naming the line when one is not JSON)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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


def _write_rounds(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, rounds_text(records))


def pack_fingerprint(path: Path) -> str | None:
    """sha256 of a pack file's bytes (None when the path is not a file, e.g. a remote node's pack)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the pack ({exc.strerror or exc})") from None
    return "sha256:" + digest.hexdigest()


def _pack_tile(paths) -> int | None:
    """The tile size shared by the packs (None when they cannot be read here or differ)."""
    from nfed.data.reader import DistrictPack

    tiles = set()
    for path in paths:
        if not Path(path).is_file():
            return None
        with DistrictPack(path) as pack:
            tiles.add(pack.tile)
    return tiles.pop() if len(tiles) == 1 else None


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
    """A resume needs a checkpoint; a fresh run needs a folder without a run's results, or `overwrite`."""
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"{run_dir / CHECKPOINT_NAME}: nothing to resume (no checkpoint in the run "
                                  "folder)")
        return
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{run_dir}: holds a federated run ({', '.join(existing)}); --resume continues it, "
                          "--overwrite replaces it")


def _failure_reason(exc: BaseException) -> str:
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

    def running(self, round_number: int, *, best_round: int | None = None, stop_reason: str | None = None) -> None:
        self.round, self.best_round, self.stop_reason = round_number, best_round or None, stop_reason
        self._write("running")

    def finished(self, result: "FederationResult") -> None:
        self.round, self.best_round, self.stop_reason = len(result.rounds), result.best_round, result.stop_reason
        if result.rounds and isinstance(result.rounds[-1].get("round"), int):
            self.round = result.rounds[-1]["round"]
        self._write("finished")

    def failed(self, exc: BaseException) -> None:
        self._write("failed", _failure_reason(exc))

    def _write(self, state: str, reason: str | None = None) -> None:
        write_status(self.run_dir, state, round_number=self.round, rounds=self.rounds, reason=reason,
                     stop_reason=self.stop_reason, best_round=self.best_round)


_recording: dict[Path, RunRecorder] = {}   # run folders this process records, so nested users share one


@contextlib.contextmanager
def recorded_run(run_dir: str | Path, *, resume: bool, overwrite: bool, rounds: int):
    """Hold the run folder (lock), check it may be written, and keep RUN/status.json for the run inside:
    running now, failed with the one-line reason if the block raises. Nested calls share the outer record.

    The folder checks come first, so a refused run never touches another run's status; a run that fails
    after them leaves its status (failed, and why) for `nfed status`."""
    run_dir = Path(run_dir)
    with new_folder(run_dir), RunLock(run_dir):
        key = run_dir.resolve()
        if key in _recording:
            yield _recording[key]
            return
        check_run_folder(run_dir, resume, overwrite)
        recorder = _recording[key] = RunRecorder(run_dir, rounds, _finished_rounds(run_dir) if resume else 0)
        try:
            recorder.running(recorder.round)
            yield recorder
        except BaseException as exc:
            with contextlib.suppress(Exception):   # the original error matters more than a failed status write
                recorder.failed(exc)
            raise
        finally:
            _recording.pop(key, None)


def _finished_rounds(run_dir: Path) -> int:
    """Rounds on record in RUN/rounds.jsonl (0 when it cannot be read: the resume will say why)."""
    try:
        return len(read_rounds(run_dir / ROUNDS_NAME))
    except NfedError:
        return 0


# ------------------------------------------------------------------------------------------ the rounds

@dataclass
class FederationResult:
    """`global_weights` after the last round; `best_weights` of the best round (what is scored on test)."""

    global_weights: dict
    rounds: list[dict]
    stop_reason: str
    results: list[dict] = field(default_factory=list)
    run_dir: Path | None = None
    best_weights: dict | None = None
    best_round: int = 0
    stop_rule: str | None = None


def select_clients(districts: Sequence[str], fraction: float, seed: int, round_number: int) -> list[str]:
    """The districts taking part in a round: all, or a seeded random fraction (at least one)."""
    if fraction >= 1.0:
        return list(districts)
    count = max(1, math.ceil(fraction * len(districts)))
    rng = np.random.default_rng([int(seed), int(round_number)])
    chosen = set(rng.choice(len(districts), size=count, replace=False).tolist())
    return [name for i, name in enumerate(districts) if i in chosen]


def _weighted_mean(pairs):
    pairs = [(v, n) for v, n in pairs if v is not None and math.isfinite(v) and n > 0]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


class Federation:
    """The server of one federated run: owns the global weights, the run folder and the round loop.

    `train_fn` / `evaluate_fn` default to nfed.federation.client.train_round / evaluate_weights; tests inject fakes.
    """

    def __init__(self, packs: Mapping[str, Path], run_dir: str | Path, train_config, fed_config: FederationConfig,
                 *, train_fn: TrainFn | None = None, evaluate_fn: Callable | None = None,
                 initial_weights: Mapping | None = None, runner=None,
                 echo: Callable[[str], None] | None = None, show_progress: bool = False,
                 data_fingerprint: Mapping[str, str | None] | None = None, tile: int | None = None,
                 train_samples: Mapping[str, int] | None = None):
        if not packs:
            raise DataError("no district packs to federate")
        self.packs = dict(packs)
        self.districts = list(self.packs)
        self.run_dir = Path(run_dir)
        self.train_config = train_config
        self.config = fed_config
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.echo = echo or (lambda text: None)
        self._initial_weights = initial_weights
        self._runner_override = runner
        self._best = (0, math.inf)   # (round, mean validation loss) of the best round so far
        self.show_progress = show_progress
        self.recorder: RunRecorder | None = None   # keeps RUN/status.json (set by federate)
        if fed_config.min_clients > len(self.districts):
            raise ConfigError(f"--min-clients {fed_config.min_clients} exceeds the {len(self.districts)} "
                              f"district(s) available")
        self._fingerprint = dict(data_fingerprint) if data_fingerprint is not None else None
        self._tile = tile if tile is not None else _pack_tile(self.packs.values())
        self._train_samples = dict(train_samples) if train_samples is not None else None
        self.registered = registered_samples()
        self.attackers: list[str] = []
        if fed_config.simulate_attack is not None:
            from nfed.federation.attacks import choose_attackers

            self.attackers = choose_attackers(self.districts, fed_config.attackers, fed_config.seed)
        self._dp_releases = 0
        if fed_config.dp_noise > 0:
            from nfed.federation.privacy import check_accountant

            check_accountant()

    def data_fingerprint(self) -> dict[str, str | None]:
        """district -> sha256 of its pack (what a resume must find again), computed once."""
        if self._fingerprint is None:
            self._fingerprint = {d: pack_fingerprint(self.packs[d]) for d in self.districts}
        return self._fingerprint

    def dp_delta(self) -> float:
        """The delta of the privacy accounting: --dp-delta, else 1 / the districts' training samples."""
        if self.config.dp_delta is not None:
            return self.config.dp_delta
        if self._train_samples is None:
            from nfed.data.reader import DistrictPack

            try:
                counts = {}
                for district in self.districts:
                    with DistrictPack(self.packs[district]) as pack:
                        counts[district] = pack.num_samples("train")
            except NfedError as exc:
                raise ConfigError(f"cannot count the training samples for the privacy accounting ({exc}): "
                                  "give --dp-delta") from None
            self._train_samples = counts
        return 1.0 / max(sum(self._train_samples.values()), 1)

    def _privacy(self, released: bool) -> dict:
        """The round record's privacy entry: epsilon spent so far at the run's delta (None: no guarantee)."""
        from nfed.federation.privacy import privacy_spent

        cfg = self.config
        self._dp_releases += int(released)
        rate = len(select_clients(self.districts, cfg.fraction, cfg.seed, 1)) / len(self.districts)
        delta = self.dp_delta()
        epsilon = privacy_spent(cfg.dp_noise, self._dp_releases, rate, delta) if cfg.dp_noise > 0 else math.inf
        return {"released": released, "releases": self._dp_releases, "epsilon": epsilon, "delta": delta,
                "noise_multiplier": cfg.dp_noise, "clip": cfg.dp_clip, "sampling_rate": rate}

    # -- set-up / resume --------------------------------------------------------------------------------
    def _fresh_state(self):
        if self._initial_weights is not None:
            weights = {k: np.array(v) for k, v in self._initial_weights.items()}
        else:
            from nfed.federation.client import host_state
            from nfed.training.trainer import build_model

            weights = host_state(build_model(self.train_config))
        return weights

    def _checkpoint_config(self) -> dict:
        config = {"federation": self.config.to_dict(), "train": self.train_config.to_dict(),
                  "data": self.data_fingerprint()}
        if self._tile is not None:
            config["tile"] = int(self._tile)   # what predict cuts images into
        return config

    def _save(self, weights, round_number: int, server, stop: StopRules, stop_reason: str | None,
              records: list[dict]) -> None:
        extra = {f"server.{k}": v for k, v in server.state_dict().items()}
        extra.update({f"stop.{k}": v for k, v in stop.state_dict().items()})
        extra["rng.seed"] = np.asarray(self.config.seed, dtype=np.int64)
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, weights, config=self._checkpoint_config(),
                        metrics={"stop_reason": stop_reason, "stop_rule": stop.fired,
                                 "districts": self.districts, "rounds_digest": rounds_digest(records),
                                 "best_round": self._best[0], "best_val_loss": self._best[1]},
                        round=round_number, extra=extra)

    def _check_data(self, checkpoint, path: Path) -> None:
        """The districts and pack contents must be those the run started with (when it recorded them)."""
        saved = checkpoint.config.get("data")
        if not isinstance(saved, dict):
            return
        current = self.data_fingerprint()
        problems = [f"{d} is new" for d in current if d not in saved]
        problems += [f"{d} is missing" for d in saved if d not in current]
        problems += [f"{d}'s pack has changed" for d in current
                     if d in saved and current[d] is not None and saved[d] is not None and current[d] != saved[d]]
        if problems:
            more = f" ({len(problems)} in all)" if len(problems) > 5 else ""
            raise ConfigError(f"{path}: --resume with other data than the run was started with: "
                              f"{'; '.join(problems[:5])}{more}")

    def _check_history(self, checkpoint, records: list[dict], path: Path) -> None:
        """rounds.jsonl must hold exactly rounds 1..N of the checkpoint's round N, unchanged."""
        done = int(checkpoint.round or 0)
        numbers = [r.get("round") for r in records]
        digest = checkpoint.metrics.get("rounds_digest")
        if numbers != list(range(1, done + 1)) or (digest is not None and rounds_digest(records) != digest):
            raise CheckpointError(f"{self.run_dir / ROUNDS_NAME}: the round history does not match {path} "
                                  f"(rounds {_span(numbers)} on file, the checkpoint is after round {done}): it "
                                  "was deleted or edited; restore it, or start afresh with --overwrite")

    def _resume(self, server, stop: StopRules):
        path = self.run_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: nothing to resume (no checkpoint in the run folder)")
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint.config.get("federation"), dict):
            raise CheckpointError(f"{path}: is {checkpoint_kind(checkpoint)}, not the global model of a "
                                  "federated run; --resume needs the global.h5 that nfed federate wrote")
        saved = checkpoint.config.get("federation", {})
        changed = [f"{k} {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in RESUME_FIELDS
                   if k in saved and _normalise(saved[k]) != _normalise(getattr(self.config, k))]
        saved_train = checkpoint.config.get("train", {})
        changed += [f"{k} {saved_train[k]!r} -> {v!r}" for k, v in self.train_config.to_dict().items()
                    if k in saved_train and k != "device" and saved_train[k] != v]
        if changed:
            raise ConfigError(f"{path}: --resume with different settings than the run was started with: "
                              f"{'; '.join(changed)}")
        from nfed.model.checkpoint import check_state_matches

        self._check_data(checkpoint, path)
        reference = self._fresh_state()
        check_state_matches(reference, checkpoint.model_state, path)
        extra = checkpoint.extra
        server.load_state_dict({k[len("server."):]: v for k, v in extra.items() if k.startswith("server.")})
        stop.load_state_dict({k[len("stop."):]: v for k, v in extra.items() if k.startswith("stop.")})
        round_number = int(checkpoint.round or 0)
        # a run killed between writing rounds.jsonl and global.h5 left one record more than the checkpoint
        records = [r for r in read_rounds(self.run_dir / ROUNDS_NAME)
                   if not isinstance(r.get("round"), int) or r["round"] <= round_number]
        self._check_history(checkpoint, records, path)
        stop_reason = checkpoint.metrics.get("stop_reason")
        stop.fired = checkpoint.metrics.get("stop_rule")
        if checkpoint.metrics.get("stop_rule") == "budget" and round_number < self.config.rounds:
            stop_reason = None  # a larger budget continues a run that only ran out of rounds
        best_loss = checkpoint.metrics.get("best_val_loss")
        self._best = (int(checkpoint.metrics.get("best_round") or 0),
                      float(best_loss) if best_loss is not None else math.inf)
        return checkpoint.model_state, round_number, records, stop_reason

    # -- one round ---------------------------------------------------------------------------------------
    def _runner(self):
        if self._runner_override is not None:
            return self._runner_override
        if self.config.workers and self.config.workers > 1:
            from nfed.federation.worker import WorkerRunner

            return WorkerRunner(self.config.workers, self.run_dir / "work", gpus=self.config.gpus)
        return SequentialRunner(self.train_fn, self.config.client_speeds, show_progress=self.show_progress)

    def _tasks(self, round_number: int, selected: Sequence[str]) -> list[ClientTask]:
        keep = self.config.client_state == "keep"
        setup = make_round_setup(self.train_config, round_number, self.config.local_epochs,
                                 keep_optimizer_state=keep)
        if self.config.dp_clip > 0:
            setup[DP_CLIP_KEY] = float(self.config.dp_clip)
        tasks = []
        for index, district in enumerate(selected):
            device = None
            if self.config.gpus:
                device = f"cuda:{self.config.gpus[index % len(self.config.gpus)]}"
            state = _latest_client_state(self.run_dir, district, round_number) if keep else None
            task_setup = setup
            if district in self.attackers:
                from nfed.federation.attacks import attack_setup

                task_setup = attack_setup(self.config.simulate_attack, setup)
            tasks.append(ClientTask(district, self.packs[district], task_setup, state, device))
        return tasks

    def _attacked(self, outcomes: list[ClientOutcome], weights, round_number: int) -> list[ClientOutcome]:
        """The outcomes with the simulated attackers' results turned hostile (--simulate-attack)."""
        if not self.attackers:
            return outcomes
        from nfed.federation.attacks import attack_result

        for outcome in outcomes:
            if outcome.district in self.attackers and outcome.status == "ok" and outcome.result is not None:
                rng = np.random.default_rng([self.config.seed, round_number, self.districts.index(outcome.district)])
                outcome.result = attack_result(self.config.simulate_attack, outcome.result, weights, rng)
        return outcomes

    def _collect(self, runner, weights, tasks: list[ClientTask], round_number: int):
        """Run the round's clients: their outcomes and the aggregator holding their accepted updates (under
        secure aggregation the runner returns the secure sum instead of individual updates)."""
        cfg = self.config
        if cfg.secure_aggregation:
            if not hasattr(runner, "run_secure"):
                raise ConfigError("secure aggregation runs over Flower (nfed flower-app --secure-aggregation)")
            from nfed.federation.privacy import SecureSumAggregator

            outcomes, aggregate = runner.run_secure(weights, tasks, cfg.deadline)
            return outcomes, {}, SecureSumAggregator(weights, aggregate, cfg.dp_clip, cfg.dp_noise)
        outcomes = self._attacked(runner.run(weights, tasks, cfg.deadline), weights, round_number)
        claims = {o.district: o.result.num_samples for o in outcomes if o.status == "ok" and o.result is not None}
        caps, reasons = cap_sample_counts(claims, self.registered, cfg.max_sample_share)
        aggregator = build_aggregator(cfg, weights)
        for outcome in outcomes:
            if outcome.status == "ok" and not aggregator.add(outcome.result.weights, caps[outcome.district],
                                                             outcome.district):
                outcome.status, outcome.reason = "rejected", aggregator.rejected[outcome.district]
        return outcomes, {d: (caps[d], why) for d, why in reasons.items()}, aggregator

    def _evaluate_all(self, weights, round_number: int, split: str) -> dict[str, dict]:
        evaluate_fn = self.evaluate_fn
        if evaluate_fn is None:
            from nfed.federation.client import evaluate_weights as evaluate_fn
        setup = make_round_setup(self.train_config, max(1, round_number), self.config.local_epochs)
        device = f"cuda:{self.config.gpus[0]}" if self.config.gpus else None
        results = {}
        for district in self.districts:
            try:
                results[district] = evaluate_fn(weights, setup, self.packs[district], split=split, device=device)
            except NfedError as exc:
                log.warning("evaluation of %s on %s failed: %s", district, split, exc)
                self.echo(f"  evaluation of {district} ({split}) failed: {exc}")
        return results

    def run(self, *, resume: bool = False, overwrite: bool = False) -> FederationResult:
        """Run (or resume) the rounds in the run folder, holding its lock. A folder with a run's results is
        only replaced with `overwrite`."""
        if resume:
            check_run_folder(self.run_dir, resume, overwrite)
        with new_folder(self.run_dir), RunLock(self.run_dir) as lock:
            if lock.stale:
                self.echo(f"note: the previous run in {self.run_dir} did not end cleanly ({lock.stale}); "
                          "its lock was stale")
            shutil.rmtree(self.run_dir / "work", ignore_errors=True)   # a killed run's worker files
            return self._run(resume, overwrite)

    def _run(self, resume: bool, overwrite: bool) -> FederationResult:
        cfg = self.config
        server = build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum)
        stop = StopRules(max_rounds=cfg.rounds, eps=cfg.eps, patience_rounds=cfg.patience_rounds, delta=cfg.delta,
                         warmup_rounds=cfg.warmup_rounds)
        if resume:
            weights, done, records, stop_reason = self._resume(server, stop)
            self.echo(f"resuming {self.run_dir} after round {done}" + (f" (stopped: {stop_reason})"
                                                                        if stop_reason else ""))
            for district in self.districts:
                _prune_client_states(self.run_dir, district, done)
        else:
            check_run_folder(self.run_dir, resume, overwrite)
            weights, done, records, stop_reason = self._fresh_state(), 0, [], None
            # a fresh run in a used folder must not pick up another run's client state or results
            shutil.rmtree(self.run_dir / "client_state", ignore_errors=True)
            for name in (RESULTS_NAME, BEST_NAME, SUMMARY_NAME):
                (self.run_dir / name).unlink(missing_ok=True)
            _write_rounds(self.run_dir / ROUNDS_NAME, [])
            self._save(weights, 0, server, stop, None, records)
        if stop_reason is None and done >= cfg.rounds:
            stop_reason = f"round budget of {cfg.rounds} spent"
        self._dp_releases = sum(1 for r in records if (r.get("privacy") or {}).get("released"))
        if self.attackers:
            self.echo(f"SIMULATED ATTACK (testing only): {cfg.simulate_attack} by {', '.join(self.attackers)}")
        runner = self._runner()
        while stop_reason is None:
            round_number = done + 1
            weights, record = self._round(runner, server, weights, round_number)
            stop_reason = stop.check(round_number, record["norm_difference"], record["mean_val_loss"])
            record["stop"] = stop_reason
            record["stop_rule"] = stop.fired
            self._track_best(weights, record)
            records.append(record)
            _write_rounds(self.run_dir / ROUNDS_NAME, records)
            self._save(weights, round_number, server, stop, stop_reason, records)
            if cfg.client_state == "keep":
                for district in self.districts:
                    _prune_client_states(self.run_dir, district, round_number)
            self.echo(_round_line(record, cfg.rounds))
            done = round_number
            self._record_progress(done, stop_reason)
        self.echo(f"stopped after round {done}: {stop_reason}")
        best_round = self._best[0]
        best_weights = weights
        if best_round and best_round != done:
            if (self.run_dir / BEST_NAME).is_file():
                best_weights = load_checkpoint(self.run_dir / BEST_NAME).model_state
            else:
                self.echo(f"{self.run_dir / BEST_NAME} is missing: the last round's model is scored instead")
                best_round = done
        self.echo(f"best round: {best_round or done} (lowest mean validation loss)" if best_round else
                  f"final model: round {done}")
        result = FederationResult(weights, records, stop_reason, run_dir=self.run_dir, best_weights=best_weights,
                                  best_round=best_round or done, stop_rule=stop.fired)
        write_json_atomic(self.run_dir / SUMMARY_NAME, {
            "rounds": done, "best_round": result.best_round, "stop_rule": stop.fired, "stop_reason": stop_reason,
            "best_mean_val_loss": self._best[1] if best_round else None,
            "clients": client_work(records), **self._defence_summary(records)})
        return result

    def _defence_summary(self, records: list[dict]) -> dict:
        """summary.json's account of the aggregation, the privacy spent and any simulated attack."""
        cfg = self.config
        summary = {"aggregator": "dp-fedavg" if cfg.dp_clip > 0 else cfg.aggregator,
                   "secure_aggregation": cfg.secure_aggregation}
        privacy = [r["privacy"] for r in records if r.get("privacy")]
        if privacy:
            summary["privacy"] = privacy[-1]
        if self.attackers:
            summary["simulated_attack"] = {"kind": cfg.simulate_attack, "attackers": self.attackers}
        return summary

    def _record_progress(self, round_number: int, stop_reason: str | None) -> None:
        if self.recorder is not None:
            self.recorder.running(round_number, best_round=self._best[0], stop_reason=stop_reason)

    def _track_best(self, weights, record: dict) -> None:
        """Keep RUN/best.h5 = the global weights of the round with the lowest mean validation loss of the
        global model (only when rounds are evaluated: clients' own validation losses are not the global's)."""
        loss = record.get("mean_val_loss")
        if not self.config.evaluate_rounds or loss is None or not math.isfinite(loss):
            return
        if loss < self._best[1]:
            self._best = (record["round"], float(loss))
            save_checkpoint(self.run_dir / BEST_NAME, weights, config=self._checkpoint_config(),
                            metrics={"mean_val_loss": float(loss), "mean_val_f1": record.get("mean_val_f1")},
                            round=record["round"])
        record["best_round"] = self._best[0]

    def _round(self, runner, server, weights, round_number: int):
        cfg = self.config
        started = time.perf_counter()
        selected = select_clients(self.districts, cfg.fraction, cfg.seed, round_number)
        outcomes, capped, aggregator = self._collect(runner, weights, self._tasks(round_number, selected),
                                                     round_number)
        clients = {}
        for outcome in outcomes:
            entry = {"status": outcome.status, "seconds": round(outcome.seconds, 3)}
            if outcome.simulated_seconds is not None:
                entry["simulated_seconds"] = round(outcome.simulated_seconds, 3)
            if outcome.reason:
                entry["reason"] = outcome.reason
            result = outcome.result
            if result is not None:
                entry["num_samples"] = clean_metrics({"n": result.num_samples}).get("n")
                entry.update({k: v for k, v in clean_metrics(result.metrics).items() if k != "wall_time_s"})
            if outcome.district in capped:
                entry["weight"], entry["capped"] = capped[outcome.district]
            if outcome.district in self.attackers:
                entry["attacker"] = cfg.simulate_attack
            # a client keeps its own optimiser state whether or not it made the deadline (not when it broke)
            if (cfg.client_state == "keep" and result is not None and result.optimizer_state
                    and entry["status"] in ("ok", "late")):
                save_checkpoint(_state_file(self.run_dir, outcome.district, round_number), {},
                                optimizer_state=result.optimizer_state, round=round_number)
            clients[outcome.district] = entry
        averaged = aggregator.finish()
        answered = aggregator.accepted
        problem = aggregator.problem
        new_weights = None
        if averaged is not None and len(answered) >= cfg.min_clients:
            new_weights = server.step(weights, averaged)
            problem = update_problem(new_weights, weights)
            if problem is not None:
                problem = f"the server step gave unusable weights ({problem})"
                log.warning("round %d: %s; previous global weights kept", round_number, problem)
                new_weights = None
        kept_previous = new_weights is None
        if kept_previous:
            new_weights, norm_difference = weights, None
        else:
            norm_difference = relative_norm_difference(trainable(new_weights), trainable(weights))
        record = {
            "round": round_number, "selected": list(selected), "answered": list(answered), "problem": problem,
            "late": [d for d, e in clients.items() if e["status"] == "late"],
            "failed": {d: e.get("reason", "") for d, e in clients.items() if e["status"] == "failed"},
            "rejected": {d: e.get("reason", "") for d, e in clients.items() if e["status"] == "rejected"},
            "kept_previous": kept_previous, "norm_difference": norm_difference, "clients": clients,
            "mean_client_val_f1": _mean([clients[d].get("val_f1") for d in answered]),
            "aggregator": aggregator.name,
        }
        if aggregator.notes:
            record["aggregation"] = aggregator.notes
        if cfg.dp_clip > 0:
            record["privacy"] = self._privacy(released=averaged is not None)
        evaluated = self._evaluate_all(new_weights, round_number, "val") if cfg.evaluate_rounds else {}
        record["global_val"] = {d: {"loss": m.get("loss"), "f1": m.get("f1"), "samples": m.get("samples")}
                                for d, m in evaluated.items()}
        if evaluated:
            record["mean_val_f1"] = _mean([m.get("f1") for m in evaluated.values()])
            record["mean_val_loss"] = _weighted_mean((m.get("loss"), m.get("samples", 1) or 1)
                                                     for m in evaluated.values())
        else:
            record["mean_val_f1"] = record["mean_client_val_f1"]
            record["mean_val_loss"] = _weighted_mean((clients[d].get("val_loss"), clients[d]["num_samples"])
                                                     for d in answered)
        record["seconds"] = round(time.perf_counter() - started, 3)
        return new_weights, record

    # -- after the rounds ----------------------------------------------------------------------------------
    def evaluate_test(self, weights, round_number: int = 0, records: Sequence[Mapping] = ()) -> list[dict]:
        """The global model on every district's test split -> RUN/federated.csv rows, with the local work
        each district's client did over the rounds of `records`."""
        work = client_work(records)
        rows = []
        for district, metrics in self._evaluate_all(weights, round_number, "test").items():
            samples = metrics.get("pack_samples", metrics.get("samples", 0))
            rows.append({"district": district, "samples": int(samples),
                         **{k: float(metrics.get(k, float("nan"))) for k in ("precision", "recall", "f1", "iou")},
                         "train_samples": metrics.get("train_samples"),
                         **(test_facts(metrics, metrics["tile"]) if "tile" in metrics else {}),
                         **work.get(district, {"epochs_run": 0, "steps": 0})})
        write_results_csv(self.run_dir / RESULTS_NAME, rows, "federated")
        return rows


def _span(numbers: list) -> str:
    """[1, 2, 3] -> '1-3', [] -> 'none', gaps or junk listed as they are."""
    if not numbers:
        return "none"
    if all(isinstance(n, int) for n in numbers) and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


def _round_line(record: dict, budget: int) -> str:
    clients = record["clients"]
    answered = record["answered"]
    times = [clients[d].get("simulated_seconds", clients[d]["seconds"]) for d in answered]
    parts = [f"round {record['round']}/{budget}: {len(answered)}/{len(record['selected'])} answered"]
    if times:
        parts.append(f"client time {min(times):.1f}-{max(times):.1f} s")
    if record["late"]:
        parts.append("late (dropped): " + ", ".join(
            f"{d} {clients[d].get('simulated_seconds', clients[d]['seconds']):.1f}s" for d in record["late"]))
    for key in ("failed", "rejected"):
        if record[key]:
            parts.append(f"{key}: " + ", ".join(f"{d} ({why})" for d, why in record[key].items()))
    if record.get("problem"):
        parts.append(f"{record['problem']}: previous global weights kept")
    elif record["kept_previous"]:
        parts.append("fewer responders than --min-clients: previous global weights kept")
    capped = [d for d, e in clients.items() if "capped" in e]
    if capped:
        parts.append("sample counts capped: " + ", ".join(capped))
    notes = record.get("aggregation") or {}
    if "selected" in notes:
        parts.append(f"multi-Krum kept {len(notes['selected'])}/{len(answered)}")
    if notes.get("clipped"):
        parts.append(f"clipped to {notes['bound']:.3g}: {', '.join(notes['clipped'])}")
    privacy = record.get("privacy")
    if privacy:
        epsilon = privacy["epsilon"]
        parts.append(f"privacy spent: epsilon {epsilon:.3g} at delta {privacy['delta']:.2g}"
                     if epsilon is not None and math.isfinite(epsilon) else "no DP noise: no privacy guarantee")
    if record.get("mean_val_f1") is not None:
        parts.append(f"mean val F1 {record['mean_val_f1']:.4f}")
    if record["norm_difference"] is not None:
        parts.append(f"norm diff {record['norm_difference']:.4g}")
    parts.append(f"{record['seconds']:.1f} s")
    return "; ".join(parts)


def find_packs(data_dir: str | Path) -> dict[str, Path]:
    """district name -> pack path for every pack in `data_dir` (DataError when missing or empty)."""
    from nfed.data.reader import DistrictPack, list_packs

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: packs folder not found")
    paths = list_packs(data_dir)
    if not paths:
        raise DataError(f"{data_dir}: no district packs (*.h5) found")
    packs = {}
    for path in paths:
        with DistrictPack(path) as pack:
            packs[pack.district] = Path(path)
    return packs


def federate(packs: Mapping[str, Path], run_dir: str | Path, train_config, fed_config: FederationConfig, *,
             resume: bool = False, overwrite: bool = False, echo: Callable[[str], None] | None = None,
             evaluate_test: bool = True, **hooks) -> FederationResult:
    """Run (or resume) a whole federation, then evaluate the global model on every test split."""
    with recorded_run(run_dir, resume=resume, overwrite=overwrite, rounds=fed_config.rounds) as recorder:
        federation = Federation(packs, run_dir, train_config, fed_config, echo=echo, **hooks)
        federation.recorder = recorder
        result = federation.run(resume=resume, overwrite=overwrite)
        if evaluate_test:
            result.results = federation.evaluate_test(result.best_weights, result.best_round, result.rounds)
        recorder.finished(result)
    return result
