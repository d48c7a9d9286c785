"""In-process orchestration of federated rounds (the study's Figure 1), with deadline, sampling and resume.

Round r: pick the participating districts (seeded by (seed, r)), send them the global weights w_{r-1} and the
round's set-up, run them (in turn with simulated speeds, or in parallel worker subprocesses with a real
deadline), drop late and failed clients, average the responders' updates (FedAvg, then the server optimiser),
evaluate w_r on every district's validation split (federated evaluation, per-district F1 for the study's
Fig. 5), test the stop rules, append the round to RUN/rounds.jsonl and checkpoint RUN/global.h5 atomically.

A late update is never averaged into a later round: each round's aggregator only sees that round's updates.
A round with fewer responders than `min_clients` keeps the previous global weights and says so.

The federated column is the global model of the round the selection rule keeps (nfed.federation.selection:
`select_by`, e.g. the highest mean validation F1; when rounds are evaluated, else the last round's), the
server-side twin of a local run's early stopping.

The run folder's layout and files are nfed.runs.runfolder's; the options nfed.federation.config's; the checks
of a resume nfed.federation.resume's; the round record nfed.federation.round_record's.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nfed.common.atomic import write_json_atomic
from nfed.common.errors import CheckpointError, ConfigError, DataError, NfedError, TrainingError
from nfed.federation import compression, norm_policy
from nfed.federation.aggregator import relative_norm_difference, trainable, update_problem
from nfed.federation.attacks import attack_setup, choose_attackers
from nfed.federation.client import ClientOutcome, ClientTask, evaluate_weights, host_state
from nfed.federation.config import FederationConfig, training_districts
from nfed.federation.heldout import held_out_rows, write_heldout
from nfed.federation.privacy import PrivacyLedger
from nfed.federation.resume import check_data, check_history, check_settings, restore_server_state, server_state
from nfed.federation.robust import build_aggregator, cap_sample_counts, registered_samples
from nfed.federation.round_record import (add_validation, client_entry, defence_summary, round_line, round_problems,
                                         round_record)
from nfed.federation.round_setup import make_round_setup
from nfed.federation.runners import NodeRunner, Runner, SecureRunner, SequentialRunner, TrainFn, select_clients
from nfed.federation.selection import Selection, describe, selection_of
from nfed.federation.server_optim import build_server_optimizer
from nfed.federation.stop_rules import StopRules
from nfed.federation.streaming import RoundStream, holds_replies
from nfed.federation.worker import WorkerRunner
from nfed.model.checkpoint import check_state_matches, checkpoint_kind, load_checkpoint, save_checkpoint
from nfed.runs.packs import pack_fingerprint, shared_tile, train_counts
from nfed.runs.results import federated_row, write_results_csv
from nfed.runs.runfolder import (BEST_NAME, CHECKPOINT_NAME, RESULTS_NAME, ROUNDS_NAME, SUMMARY_NAME, WORK_NAME,
                                 RunRecorder, clear_run_folder, client_local_state, client_work, latest_state,
                                 prune_client_states, read_rounds, recorded_run, residual_extra, residual_of,
                                 rounds_digest, state_file, write_rounds)
from nfed.training.environment import RunEnvironment, default_environment
from nfed.training.trainer import build_model

log = logging.getLogger(__name__)


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


class Federation:
    """The server of one federated run: owns the global weights, the run folder and the round loop.

    `train_fn` / `evaluate_fn` default to nfed.federation.client.train_round / evaluate_weights; tests inject fakes.
    """

    def __init__(self, packs: Mapping[str, Path], run_dir: str | Path, train_config, fed_config: FederationConfig,
                 *, train_fn: TrainFn | None = None, evaluate_fn: Callable | None = None,
                 initial_weights: Mapping | None = None, runner: Runner | None = None,
                 echo: Callable[[str], None] | None = None, show_progress: bool = False,
                 data_fingerprint: Mapping[str, str | None] | None = None, tile: int | None = None,
                 train_samples: Mapping[str, int] | None = None, env: RunEnvironment | None = None,
                 adapt_fn: Callable | None = None, on_round: Callable[[dict], None] | None = None):
        if not packs:
            raise DataError("no district packs to federate")
        self.packs = dict(packs)
        self.districts = list(self.packs)   # every district is scored
        self.training = training_districts(self.districts, fed_config.hold_out)   # those that are selected
        self.held_out = list(fed_config.hold_out)
        self.run_dir = Path(run_dir)
        self.train_config = train_config
        self.config = fed_config
        self.env = env or default_environment()   # the server's; clients on --gpus get one GPU each
        self._gpu_envs = tuple(self.env.on_gpu(gpu) for gpu in fed_config.gpus)   # each parsed and checked once
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.adapt_fn = adapt_fn   # scores a held-out district after AdaBN (default: evaluate_weights' adapt_on)
        self.echo = echo or (lambda text: None)
        self._initial_weights = initial_weights
        self._runner_override = runner
        self.selection = selection_of(fed_config)   # the kept round so far (RUN/best.h5)
        self._local: dict[str, dict] = {}   # district -> its own BatchNorm tensors (--norm-policy fedbn / silobn)
        self.show_progress = show_progress
        self.recorder = None   # told each round's progress (default: the held run's RunRecorder, RUN/status.json)
        self.on_round = on_round   # told each finished round's record once it is on disk (e.g. experiment tracking)
        self._progress: RunRecorder | None = None
        if fed_config.min_clients > len(self.training):
            raise ConfigError(f"--min-clients {fed_config.min_clients} exceeds the {len(self.training)} "
                              f"district(s) available" + (" to train" if self.held_out else ""))
        self._fingerprint = dict(data_fingerprint) if data_fingerprint is not None else None
        self._tile = tile if tile is not None else shared_tile(self.packs.values())
        self.registered = registered_samples()
        # what each district's pack announced when it joined: no claim of a round may exceed it
        self.announced = train_samples if train_samples is not None else train_counts(self.packs)   # may be live
        self.attackers: list[str] = []
        if fed_config.simulate_attack is not None:
            self.attackers = choose_attackers(self.training, fed_config.attackers, fed_config.seed)
        self.privacy = None
        if fed_config.dp_clip > 0:
            rate = len(select_clients(self.training, fed_config.fraction, fed_config.seed, 1)) / len(self.training)
            training = {d: self.packs[d] for d in self.training}
            counted = ({d: self.announced[d] for d in self.training} if set(self.announced) == set(self.districts)
                       else None)
            self.privacy = PrivacyLedger(fed_config, training, rate, counted)

    def data_fingerprint(self) -> dict[str, str | None]:
        """district -> sha256 of its pack (what a resume must find again), computed once."""
        if self._fingerprint is None:
            self._fingerprint = {d: pack_fingerprint(self.packs[d]) for d in self.districts}
        return self._fingerprint

    # -- set-up / resume --------------------------------------------------------------------------------
    def _fresh_state(self):
        if self._initial_weights is not None:
            weights = {k: np.array(v) for k, v in self._initial_weights.items()}
        else:
            weights = host_state(build_model(self.train_config, "cpu"))
        return weights

    def _checkpoint_config(self) -> dict:
        config = {"federation": self.config.to_dict(), "train": self.train_config.to_dict(),
                  "data": self.data_fingerprint(), "environment": self.env.record()}
        if self._tile is not None:
            config["tile"] = int(self._tile)   # what predict cuts images into
        return config

    def _save(self, weights, round_number: int, server, stop: StopRules, stop_reason: str | None,
              records: list[dict]) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, weights, config=self._checkpoint_config(),
                        metrics={"stop_reason": stop_reason, "stop_rule": stop.fired,
                                 "districts": self.districts, "rounds_digest": rounds_digest(records),
                                 "best_round": self.selection.best_round, "selection_rule": self.selection.rule},
                        round=round_number, extra=server_state(server, stop, self.config.seed))

    def _resume(self, server, stop: StopRules):
        path = self.run_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: nothing to resume (no checkpoint in the run folder)")
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint.config.get("federation"), dict):
            raise CheckpointError(f"{path}: is {checkpoint_kind(checkpoint)}, not the global model of a "
                                  "federated run; --resume needs the global.h5 that nfed federate wrote")
        check_settings(checkpoint.config, self.config, self.train_config, path)
        check_data(checkpoint.config.get("data"), self.data_fingerprint(), path)
        reference = self._fresh_state()
        check_state_matches(reference, checkpoint.model_state, path)
        restore_server_state(checkpoint.extra, server, stop)
        round_number = int(checkpoint.round or 0)
        # a run killed between writing rounds.jsonl and global.h5 left one record more than the checkpoint
        records = [r for r in read_rounds(self.run_dir / ROUNDS_NAME)
                   if not isinstance(r.get("round"), int) or r["round"] <= round_number]
        check_history(checkpoint, records, self.run_dir / ROUNDS_NAME, path)
        stop_reason = checkpoint.metrics.get("stop_reason")
        stop.fired = checkpoint.metrics.get("stop_rule")
        if checkpoint.metrics.get("stop_rule") == "budget" and round_number < self.config.rounds:
            stop_reason = None  # a larger budget continues a run that only ran out of rounds
        self._replay_selection(records, checkpoint.metrics, path)
        return checkpoint.model_state, round_number, records, stop_reason

    # -- one round ---------------------------------------------------------------------------------------
    def _runner(self) -> Runner:
        if self._runner_override is not None:
            return self._runner_override
        if self.config.workers and self.config.workers > 1:
            return WorkerRunner(self.config.workers, self.run_dir / WORK_NAME, gpus=self.config.gpus)
        return SequentialRunner(self.train_fn, self.config.client_speeds, show_progress=self.show_progress)

    def _tasks(self, round_number: int, selected: Sequence[str]) -> list[ClientTask]:
        keep = self.config.client_state == "keep"
        feedback = self.config.compress == "int8-ef"
        setup = make_round_setup(self.train_config, round_number, self.config.local_epochs,
                                 keep_optimizer_state=keep, prox_mu=self.config.prox_mu,
                                 norm_policy=self.config.norm_policy, compress=self.config.compress,
                                 dp_clip=self.config.dp_clip)
        tasks = []
        for index, district in enumerate(selected):
            env = self._gpu_envs[index % len(self._gpu_envs)] if self._gpu_envs else self.env
            saved = latest_state(self.run_dir, district, round_number) if keep or feedback else None
            state = saved.optimizer_state if keep and saved is not None else None
            residual = residual_of(saved) if feedback else None
            task_setup = setup
            if district in self.attackers:
                task_setup = attack_setup(self.config.simulate_attack, setup)
            tasks.append(ClientTask(district, self.packs[district], task_setup, state, env, self._local.get(district),
                                    residual))
        return tasks

    def _decoded(self, outcomes: list[ClientOutcome], shared) -> list[ClientOutcome]:
        """The outcomes with each compressed update turned back into weights (the server's float32 global model +
        the decoded delta) and what each update weighed on the wire; a malformed one is rejected in one line."""
        plain = norm_policy.shared_bytes(shared, "shared")
        for outcome in outcomes:
            result = outcome.result
            if result is None:
                continue
            if result.update is None:
                result.bytes_up = result.bytes_up or plain
                continue
            payload, result.update = result.update, None
            result.bytes_up = result.bytes_up or compression.payload_bytes(payload)
            if outcome.status != "ok":   # a late reply is never averaged: its update is counted, not decoded
                result.weights = {}
                continue
            try:
                delta = compression.decode(payload, shared, plain + compression.MANIFEST_SLACK_BYTES)
            except DataError as exc:
                log.warning("rejected update from %s: %s", outcome.district, exc)
                outcome.status, outcome.reason = "rejected", str(exc)
                result.weights = {}
                continue
            result.weights = norm_policy.merge(compression.apply_delta(shared, delta), result.weights)
        return outcomes

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
        secure aggregation the runner returns the secure sum instead of individual updates). The aggregator sees
        the shared part of the updates; a district's local part (its BatchNorm under fedbn / silobn) is checked
        here and stays out of it, and must not come at all from a transport whose nodes keep it (Flower)."""
        cfg = self.config
        shared = norm_policy.split(weights, cfg.norm_policy)[0]
        if cfg.secure_aggregation:
            if not isinstance(runner, SecureRunner):
                raise ConfigError("secure aggregation runs over Flower (nfed flower-app --secure-aggregation)")
            from nfed.federation.privacy import SecureSumAggregator

            outcomes, aggregate = runner.run_secure(weights, tasks, cfg.deadline)
            return outcomes, {}, SecureSumAggregator(shared, aggregate, cfg.dp_clip, cfg.dp_noise)
        # a transport that encodes the broadcast itself (Flower) gets the float32 model
        encodes = isinstance(runner, NodeRunner) and runner.encodes_broadcast
        sent = weights if encodes else compression.broadcast(weights, cfg.broadcast)
        stream = self._stream(runner, weights, round_number)
        if stream is not None:   # each reply is folded in as it arrives (nfed.federation.streaming)
            outcomes, stream = runner.run_streaming(sent, tasks, cfg.deadline, stream)
            return outcomes, stream.capped, stream.aggregator
        outcomes = self._attacked(self._decoded(runner.run(sent, tasks, cfg.deadline), shared), weights, round_number)
        aggregator = build_aggregator(cfg, shared)
        return outcomes, self._accept(runner, weights, outcomes, aggregator, cfg.max_sample_share), aggregator

    def _stream(self, runner, weights, round_number: int) -> RoundStream | None:
        """The round's RoundStream when the runner streams and the aggregation allows it (None: hold every reply;
        said once). The runner may open the next round's early, for replies that come with an evaluation."""
        if not (isinstance(runner, NodeRunner) and runner.streams):
            return None
        shared = norm_policy.split(weights, self.config.norm_policy)[0]
        aggregator = build_aggregator(self.config, shared)
        held = holds_replies(self.config, aggregator)
        if held is not None:
            if not getattr(self, "_said_held", False):
                self.echo(f"the server holds each round's replies until its last: {held}")
                self._said_held = True
            return None
        runner.open_stream = lambda later, number: self._stream(runner, later, number)

        def fold(outcome: ClientOutcome) -> dict:
            [outcome] = self._attacked(self._decoded([outcome], shared), weights, round_number)
            return self._accept(runner, weights, [outcome], aggregator, 1.0)   # the announced cap needs no other claim
        return RoundStream(round_number, weights, aggregator, fold)

    def _accept(self, runner, weights, outcomes: list[ClientOutcome], aggregator, max_share: float) -> dict:
        """Cap the ok outcomes' claimed sample counts and add their updates to `aggregator` (an update it refuses,
        or whose local tensors do not fit, is marked rejected): district -> (weight, why) of each capped claim."""
        cfg = self.config
        local_reference = norm_policy.split(weights, cfg.norm_policy)[1]
        at_nodes = isinstance(runner, NodeRunner) and runner.keeps_local_state
        claims = {o.district: o.result.num_samples for o in outcomes if o.status == "ok" and o.result is not None}
        caps, reasons = cap_sample_counts(claims, self.registered, max_share, self.announced)
        for outcome in outcomes:
            if outcome.status != "ok":
                continue
            update, local = outcome.result.weights, {}
            if local_reference and isinstance(update, Mapping):
                update, local = norm_policy.split(update, cfg.norm_policy)
                problem = (update_problem(local, local_reference) if not at_nodes else
                           f"it sent {len(local)} tensor(s) that stay with the district" if local else None)
                if problem is not None:
                    log.warning("rejected update from %s: %s", outcome.district, problem)
                    outcome.status, outcome.reason = "rejected", problem
                    continue
            if not aggregator.add(update, caps[outcome.district], outcome.district):
                outcome.status, outcome.reason = "rejected", aggregator.rejected[outcome.district]
        return {d: (caps[d], why) for d, why in reasons.items()}

    def _evaluate_all(self, weights, round_number: int, split: str,
                      local_states: Mapping[str, dict] | None = None,
                      districts: Sequence[str] | None = None) -> dict[str, dict]:
        """Every district's (or `districts'`) scores of `weights`, each with its own local tensors (`local_states`,
        by default the latest) in place under a norm policy other than shared."""
        local_states = self._local if local_states is None else local_states
        own = self.config.norm_policy != "shared"
        evaluate_fn = self.evaluate_fn
        if evaluate_fn is None:
            evaluate_fn = evaluate_weights
        setup, env = self._evaluation_setup(round_number)
        results = {}
        for district in self.districts if districts is None else districts:
            try:
                local = {"local_state": local_states.get(district)} if own else {}
                results[district] = evaluate_fn(weights, setup, self.packs[district], split=split, env=env, **local)
            except NfedError as exc:
                log.warning("evaluation of %s on %s failed: %s", district, split, exc)
                self.echo(f"  evaluation of {district} ({split}) failed: {exc}")
        return results

    def _evaluation_setup(self, round_number: int):
        """(set-up, environment) of the server's evaluations: the round's set-up, on the first --gpus GPU."""
        setup = make_round_setup(self.train_config, max(1, round_number), self.config.local_epochs)
        return setup, self._gpu_envs[0] if self._gpu_envs else self.env

    def run(self, *, resume: bool = False, overwrite: bool = False, held: RunRecorder | None = None
            ) -> FederationResult:
        """Run (or resume) the rounds in the run folder, held for the run: by the caller, who hands in the `held`
        run (federate), else here (recorded_run: the lock, the folder checked once, RUN/status.json). A folder
        with a run's results is only replaced with `overwrite`."""
        if held is not None:
            return self._run(resume, held)
        with recorded_run(self.run_dir, resume=resume, overwrite=overwrite, rounds=self.config.rounds,
                          echo=self.echo) as held:
            result = self._run(resume, held)
            held.finished(result)
        return result

    def _run(self, resume: bool, held: RunRecorder) -> FederationResult:
        cfg = self.config
        self._progress = self.recorder or held
        shutil.rmtree(self.run_dir / WORK_NAME, ignore_errors=True)   # a killed run's worker files
        server = build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum)
        stop = StopRules(max_rounds=cfg.rounds, eps=cfg.eps, patience_rounds=cfg.patience_rounds, delta=cfg.delta,
                         warmup_rounds=cfg.warmup_rounds)
        if resume:
            weights, done, records, stop_reason = self._resume(server, stop)
            self.echo(f"resuming {self.run_dir} after round {done}" + (f" (stopped: {stop_reason})"
                                                                        if stop_reason else ""))
            prune_client_states(self.run_dir, self.districts, done, self.selection.best_round)
            self._local = self._read_local_states(weights, done + 1)
        else:
            weights, done, records, stop_reason = self._fresh_state(), 0, [], None
            clear_run_folder(self.run_dir)
            self._save(weights, 0, server, stop, None, records)
        if stop_reason is None and done >= cfg.rounds:
            stop_reason = f"round budget of {cfg.rounds} spent"
        if self.privacy is not None:
            self.privacy.resume(records)
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
            write_rounds(self.run_dir / ROUNDS_NAME, records)
            self._save(weights, round_number, server, stop, stop_reason, records)
            if cfg.client_state == "keep" or cfg.norm_policy != "shared" or cfg.compress == "int8-ef":
                prune_client_states(self.run_dir, self.districts, round_number, self.selection.best_round)
            self.echo(round_line(record, cfg.rounds, records, stop))
            done = round_number
            self._record_progress(done, stop_reason, round_problems(record))
            if self.on_round is not None:
                self.on_round(record)
        if records and not any(record["answered"] for record in records):
            raise TrainingError(f"no district's update was accepted in any of the {done} round(s) (see "
                                f"{self.run_dir / ROUNDS_NAME}): the global model is the initial one")
        self.echo(f"stopped after round {done}: {stop_reason}")
        best_round = self.selection.best_round
        best_weights = weights
        if best_round and best_round != done:
            if (self.run_dir / BEST_NAME).is_file():
                best_weights = load_checkpoint(self.run_dir / BEST_NAME).model_state
            else:
                self.echo(f"{self.run_dir / BEST_NAME} is missing: the last round's model is scored instead")
                best_round = done
        rule = describe(self.selection.rule, self.selection.window)
        self.echo(f"best round: {best_round or done} ({rule})" if best_round else f"final model: round {done}")
        if not best_round and done and cfg.evaluate_rounds:   # nothing kept (a run inside its warm-up): the last round
            save_checkpoint(self.run_dir / BEST_NAME, weights, config=self._checkpoint_config(), round=done)
        result = FederationResult(weights, records, stop_reason, run_dir=self.run_dir, best_weights=best_weights,
                                  best_round=best_round or done, stop_rule=stop.fired)
        write_json_atomic(self.run_dir / SUMMARY_NAME, {
            "rounds": done, "best_round": result.best_round, "stop_rule": stop.fired, "stop_reason": stop_reason,
            **self._kept_summary(records, best_round), "environment": self.env.record(),
            "clients": client_work(records), "norm_policy": cfg.norm_policy, "hold_out": self.held_out,
            "traffic": compression.traffic_summary(records, cfg.compress, cfg.broadcast),
            **defence_summary(cfg, records, self.attackers)})
        return result

    def _read_local_states(self, weights, before_round: int) -> dict[str, dict]:
        """district -> its own local tensors of its last round before `before_round` (RUN/client_state/), each
        checked against the model's local names and shapes."""
        if self.config.norm_policy == "shared":
            return {}
        reference = norm_policy.split(weights, self.config.norm_policy)[1]
        states = {}
        for district in self.districts:
            state = client_local_state(self.run_dir, district, before_round)
            if state is not None:
                check_state_matches(reference, state, state_file(self.run_dir, district, before_round - 1).parent)
                states[district] = state
        return states

    def _record_progress(self, round_number: int, stop_reason: str | None, problems: dict | None = None) -> None:
        if self._progress is not None:
            self._progress.running(round_number, best_round=self.selection.best_round, stop_reason=stop_reason,
                                  problems=problems)

    def _track_best(self, weights, record: dict) -> None:
        """Keep RUN/best.h5 = the global weights of the round the selection rule keeps, written when the round
        becomes the kept one (only when rounds are evaluated: clients' own validation metrics are not the
        global's)."""
        if not self.config.evaluate_rounds:
            return
        if self.selection.update(record):
            save_checkpoint(self.run_dir / BEST_NAME, weights, config=self._checkpoint_config(),
                            metrics={"mean_val_loss": record.get("mean_val_loss"),
                                     "mean_val_f1": record.get("mean_val_f1"), "selection_rule": self.selection.rule,
                                     "selection_value": self.selection.best_value},
                            round=record["round"])
        record["best_round"] = self.selection.best_round

    def _replay_selection(self, records: list[dict], saved: Mapping, path: Path) -> None:
        """The kept round so far, replayed from rounds.jsonl; it must be the round the checkpoint says best.h5
        holds (a run started under another rule cannot continue under this one)."""
        self.selection = Selection.replay(self.selection.rule, self.selection.window, records, self.selection.warmup)
        kept = int(saved.get("best_round") or 0)
        if kept != self.selection.best_round:
            was = saved.get("selection_rule", "loss")
            raise ConfigError(f"{path}: the run kept round {kept} (--select-by {was}); --select-by "
                              f"{self.selection.rule} would keep round {self.selection.best_round}: resume with "
                              f"--select-by {was}")

    def _kept_summary(self, records: list[dict], best_round: int) -> dict:
        """summary.json's account of the kept round: its rule, its validation loss and F1, and the best
        validation F1 of any round after the warm-up (what the report compares it with)."""
        selection = self.selection
        kept = next((r for r in records if r.get("round") == best_round), {}) if selection.best_round else {}
        top = Selection.replay("f1", 1, records, selection.warmup)   # the best F1 of the rounds that could be kept
        return {"selection_rule": selection.rule, "selection_window": selection.window,
                "selection": describe(selection.rule, selection.window),
                "best_mean_val_loss": kept.get("mean_val_loss"), "best_mean_val_f1": kept.get("mean_val_f1"),
                "top_mean_val_f1": top.best_value if top.best_round else None,
                "top_mean_val_f1_round": top.best_round or None}

    def _round(self, runner, server, weights, round_number: int):
        cfg = self.config
        started = time.perf_counter()
        selected = select_clients(self.training, cfg.fraction, cfg.seed, round_number)
        shared = norm_policy.split(weights, cfg.norm_policy)[0]
        tasks = self._tasks(round_number, selected)
        residuals = {task.district: task.residual for task in tasks}
        outcomes, capped, aggregator = self._collect(runner, weights, tasks, round_number)
        sent = runner.bytes_down if isinstance(runner, NodeRunner) else None
        down = sent or compression.broadcast_bytes(shared, cfg.broadcast)
        clients = {}
        for outcome in outcomes:
            entry = client_entry(outcome, capped, cfg.simulate_attack if outcome.district in self.attackers else None)
            result = outcome.result
            # a district keeps the local tensors of its accepted update (they never reach the average); over Flower
            # its node keeps them
            at_nodes = isinstance(runner, NodeRunner) and runner.keeps_local_state
            own = cfg.norm_policy != "shared" and entry["status"] == "ok" and not at_nodes
            if own:
                self._local[outcome.district] = norm_policy.split(result.weights, cfg.norm_policy)[1]
            # a client keeps its own optimiser state whether or not it made the deadline (not when it broke)
            kept = (result.optimizer_state if cfg.client_state == "keep" and result is not None
                    and entry["status"] in ("ok", "late") else None)
            # int8-ef: the residual of an update the round took, else the one the client had
            residual = (result.residual if entry["status"] == "ok" and result is not None
                        else residuals.get(outcome.district)) if cfg.compress == "int8-ef" else None
            if kept or own or residual:
                save_checkpoint(state_file(self.run_dir, outcome.district, round_number),
                                self._local.get(outcome.district, {}), optimizer_state=kept or None,
                                round=round_number, extra=residual_extra(residual))
            entry["bytes_down"] = down
            if result is not None and result.bytes_up:
                entry["bytes_up"] = int(result.bytes_up)
            clients[outcome.district] = entry
        averaged = aggregator.finish()
        answered = aggregator.accepted
        problem = aggregator.problem
        new_weights = None
        if averaged is not None and len(answered) >= cfg.min_clients:
            new_weights = server.step(shared, averaged)
            problem = update_problem(new_weights, shared)
            if problem is not None:
                problem = f"the server step gave unusable weights ({problem})"
                log.warning("round %d: %s; previous global weights kept", round_number, problem)
                new_weights = None
        kept_previous = new_weights is None
        if kept_previous:
            new_weights, norm_difference = weights, None
        else:
            norm_difference = relative_norm_difference(trainable(new_weights), trainable(shared))
            # what no district shares (fedbn / silobn) keeps the global model's values: its initial ones
            new_weights = {name: new_weights.get(name, value) for name, value in weights.items()}
        record = round_record(round_number, selected, clients, aggregator, problem, kept_previous, norm_difference)
        record["norm_policy"] = cfg.norm_policy
        record["shared_bytes"] = norm_policy.shared_bytes(weights, cfg.norm_policy)   # what each client sends
        record.update(compress=cfg.compress, broadcast=cfg.broadcast,
                      bytes_up=sum(e.get("bytes_up", 0) for e in clients.values()),
                      bytes_down=sum(e.get("bytes_down", 0) for e in clients.values()))
        refused = runner.refused_nodes if isinstance(runner, NodeRunner) else None   # SuperNodes left out (Flower)
        if refused:
            record["refused_nodes"] = {str(node): why for node, why in refused.items()}
        if self.privacy is not None:
            record["privacy"] = self.privacy.record(released=averaged is not None)
        # held-out districts are not validated: the stop and selection rules see the training districts only
        add_validation(record, self._evaluate_all(new_weights, round_number, "val", districts=self.training)
                       if cfg.evaluate_rounds else {})
        record["seconds"] = round(time.perf_counter() - started, 3)
        return new_weights, record

    # -- after the rounds ----------------------------------------------------------------------------------
    def evaluate_test(self, weights, round_number: int = 0, records: Sequence[Mapping] = ()) -> list[dict]:
        """The global model on every district's test split -> RUN/federated.csv rows, with the local work
        each district's client did over the rounds of `records`."""
        work = client_work(records)
        local_states = self._read_local_states(weights, round_number + 1)   # the round's own, each district's
        scores = self._evaluate_all(weights, round_number, "test", local_states)
        rows = [federated_row(district, metrics, work.get(district, {"epochs_run": 0, "steps": 0}))
                for district, metrics in scores.items()]
        write_results_csv(self.run_dir / RESULTS_NAME, rows, "federated")
        if self.held_out:
            self.score_held_out(weights, round_number, scores)
        return rows

    def score_held_out(self, weights, round_number: int, scores: Mapping[str, Mapping]) -> list[dict]:
        """RUN/heldout.csv: each held-out district's test F1 under the global model (`scores`, as scored for
        federated.csv) and after AdaBN on its own training tiles; no district trained it, so it has no BatchNorm
        of its own under fedbn / silobn (the global model's initial ones, re-estimated by the adaptation)."""
        adapt_fn = self.adapt_fn
        if adapt_fn is None:
            adapt_fn = evaluate_weights
        setup, env = self._evaluation_setup(round_number)
        adapted = {}
        for district in self.held_out:
            try:
                adapted[district] = adapt_fn(weights, setup, self.packs[district], split="test", env=env,
                                             adapt_on="train")
            except NfedError as exc:
                log.warning("adapting to %s failed: %s", district, exc)
                self.echo(f"  adapting to {district} failed: {exc}")
        rows = held_out_rows(self.held_out, scores, adapted)
        write_heldout(self.run_dir, rows)
        for row in rows:
            self.echo(f"  held out {row['district']}: global F1 {_shown(row['global_f1'])}, after AdaBN on its "
                      f"training tiles {_shown(row['adapted_f1'])}")
        return rows


def _shown(f1: float | None) -> str:
    return "-" if f1 is None else f"{f1:.4f}"



def federate(packs: Mapping[str, Path], run_dir: str | Path, train_config, fed_config: FederationConfig, *,
             resume: bool = False, overwrite: bool = False, echo: Callable[[str], None] | None = None,
             evaluate_test: bool = True, held: RunRecorder | None = None, plan: str | None = None,
             **hooks) -> FederationResult:
    """Run (or resume) a whole federation, then evaluate the global model on every test split.

    The run folder is held (locked, checked, its status kept) once, here, unless the caller holds it already and
    hands in the `held` run (recorded_run; Flower's ServerApp while its nodes connect). `plan`: the line said once
    the folder is held and checked, so a refused run says nothing of what it would have done."""
    echo = echo or (lambda text: None)
    if held is not None and Path(held.run_dir).resolve() != Path(run_dir).resolve():
        raise ValueError(f"the held run folder {held.run_dir} is not {run_dir}: the run holds its own folder")
    with nullcontext(held) if held is not None else recorded_run(run_dir, resume=resume, overwrite=overwrite,
                                                                  rounds=fed_config.rounds, echo=echo) as recorder:
        if plan:
            echo(plan)
        federation = Federation(packs, run_dir, train_config, fed_config, echo=echo, **hooks)
        result = federation.run(resume=resume, held=recorder)
        if evaluate_test:
            result.results = federation.evaluate_test(result.best_weights, result.best_round, result.rounds)
        recorder.finished(result)
    return result
