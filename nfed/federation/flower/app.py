"""nfed's federated protocol over Flower: the ServerApp and ClientApp a written Flower app's pyproject.toml names
(`nfed.federation.flower:server_app`, `nfed.federation.flower:client_app`: the package hands on this module's).

The ServerApp runs nfed's Federation: the rounds, aggregation (FedAvg, FedAvgM, FedAdam), stop rules,
min-clients, checkpoint/resume and the run folder (global.h5, rounds.jsonl, federated.csv, status.json) are
nfed.federation.server's and nfed.runs.runfolder's, unchanged. It only supplies the transport
(nfed.federation.flower.transport.FlowerClients), which plays the role of the in-process runner and evaluation
function by sending Flower messages to the SuperNode of each district and waiting for the replies up to the
deadline. Which node serves which district is nfed.federation.roster's: the nodes are listed again before every
exchange (a restarted node rejoins, a dead one is noticed), and an allow-list (`districts`) keeps unplanned ones
out. The run configuration is nfed.federation.flower.config's, the message format nfed.federation.flower.messages'.

Messages (flwr Message API, one SuperLink, one SuperNode per district):
- query:    server -> node: "describe"; node -> server: its district, tile size, split sizes (from its pack)
- train:    server -> node: global weights + the round's set-up (+ optionally the previous round's evaluation
            to do first); node -> server: weights, samples, metrics (+ that evaluation's metrics)
- evaluate: server -> node: global weights + set-up + split; node -> server: loss and change metrics
A node reads only the HDF5 pack named in its node config (`pack="/data/Gangnam-gu.h5"`): the data never leaves it.

Under --norm-policy fedbn / silobn the weights both ways are the shared tensors only: a node keeps its district's own
BatchNorm tensors of every round it trained in its Flower context state and puts in place those of its last round
up to the one it trains from or evaluates (the model's initial ones before its first), as the in-process server
does with RUN/client_state. The context state lives for one `flwr run`: a resumed run starts every district's
BatchNorm afresh (in process a resume is exact), and a node keeps the BatchNorm of a round whose update the server
left out (late or rejected), where the in-process server keeps the district's previous one.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from nfed.common.errors import ConfigError, one_line
from nfed.common.names import printable
from nfed.federation import norm_policy
from nfed.federation.client import evaluate_weights, train_round
from nfed.federation.compression import received
from nfed.federation.flower.config import settings_from_run_config
from nfed.federation.flower.messages import (RESULT_RECORD, SETUP_RECORD, WEIGHTS_RECORD, from_json_record, json_record,
                                             record_to_weights, update_to_record, weights_to_record)
from nfed.federation.flower.transport import FlowerClients, round_plan
from nfed.federation.roster import AnnouncedCounts, Roster
from nfed.federation.round_setup import RoundSetup
from nfed.federation.server import federate
from nfed.gpu.precision import parse_precision
from nfed.runs.packs import describe_pack, pack_district
from nfed.runs.runfolder import recorded_run
from nfed.runs.tracking import run_params, tracked
from nfed.training.environment import RunEnvironment

log = logging.getLogger(__name__)

CLIENT_ERROR_CODE = 7001
RESIDUAL_STATE = "nfed.residual"   # int8-ef's error feedback, in the node's context state for the run
LOCAL_STATE = "nfed.local."        # + round: the district's own tensors after that round (fedbn / silobn)



client_app = ClientApp()


def node_pack(context: Context) -> Path:
    """The HDF5 pack named in this SuperNode's node config (`--node-config 'pack="/data/X.h5"'`)."""
    pack = context.node_config.get("pack")
    if not pack:
        raise ConfigError("this SuperNode has no pack: start it with --node-config 'pack=\"/path/District.h5\"'")
    return Path(str(pack)).expanduser()


def node_environment(context: Context) -> RunEnvironment:
    """Where this node computes (never the server's): node config `device`, else $NFED_DEVICE, else cpu; node
    config `precision`, else $NFED_PRECISION, else fp32."""
    config = context.node_config
    return RunEnvironment.from_options(str(config.get("device") or "") or None,
                                       parse_precision(str(config.get("precision") or "") or None))


def _error_reply(message: Message, exc: BaseException) -> Message:
    log.error("nfed client failed: %s", one_line(exc))
    return Message(Error(code=CLIENT_ERROR_CODE, reason=one_line(exc)), reply_to=message)


def with_own_tensors(weights: Mapping, setup: RoundSetup, context: Context, up_to_round: int) -> Mapping:
    """The received shared weights with the district's own tensors in place under the set-up's norm policy: those
    of its last round <= `up_to_round` kept in the context state, else the model's initial ones."""
    policy = setup.norm_policy
    if policy == "shared":
        return weights
    kept = {int(key[len(LOCAL_STATE):]): key for key in context.state.array_records
            if key.startswith(LOCAL_STATE) and key[len(LOCAL_STATE):].isdigit()}
    rounds = [r for r in kept if r <= up_to_round]
    if rounds:
        own = record_to_weights(context.state.array_records[kept[max(rounds)]])
    else:
        from nfed.federation.client import host_state
        from nfed.training.trainer import build_model

        own = norm_policy.split(host_state(build_model(setup.config, "cpu")),
                                policy)[1]
    return norm_policy.merge(norm_policy.split(weights, policy)[0], own)


def keep_own_tensors(result, setup: RoundSetup, context: Context) -> None:
    """Keep the district's own tensors of a trained round in the context state; `result.weights` is left with the
    shared ones alone (what the node sends)."""
    policy = setup.norm_policy
    if policy != "shared":
        result.weights, own = norm_policy.split(result.weights, policy)
        context.state[f"{LOCAL_STATE}{setup.round}"] = weights_to_record(own)


@client_app.query()
def client_describe(message: Message, context: Context) -> Message:
    try:
        info = describe_pack(node_pack(context))
    except Exception as exc:  # the reason travels back as one line; the node keeps serving
        return _error_reply(message, exc)
    return Message(RecordDict({RESULT_RECORD: json_record(info=info)}), reply_to=message)


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    """One round of local training on this node's pack with nfed.federation.client.train_round (or, under secure
    aggregation, one stage of Flower's SecAgg+ protocol around it: nfed.federation.flower.secagg); when the set-up
    asks for it (`evaluate`: the previous round's evaluation travelling with this round), the received weights are
    first evaluated on that split, so one message does the work of two."""
    from nfed.federation.flower.secagg import is_secure_message, secure_train

    if is_secure_message(message):
        try:
            return secure_train(message, context, node_pack, node_environment)
        except Exception as exc:
            return _error_reply(message, exc)
    try:
        weights = received(record_to_weights(message.content[WEIGHTS_RECORD]))
        setup = RoundSetup.from_dict(from_json_record(message.content[SETUP_RECORD], "setup"))
        pack, env = node_pack(context), node_environment(context)
        extra = {}
        if "evaluate" in message.content[SETUP_RECORD]:
            evaluation = from_json_record(message.content[SETUP_RECORD], "evaluate")
            evaluated = RoundSetup.from_dict(evaluation["setup"])
            own = with_own_tensors(weights, evaluated, context, evaluated.round)
            extra["evaluation"] = evaluate_weights(own, evaluated, pack, split=evaluation["split"], env=env)
        kept = context.state.array_records.get(RESIDUAL_STATE)
        result = train_round(with_own_tensors(weights, setup, context, setup.round - 1), setup, pack,
                             env=env, residual=record_to_weights(kept) if kept is not None and len(kept) else None)
        keep_own_tensors(result, setup, context)
        district = pack_district(pack)
    except Exception as exc:
        return _error_reply(message, exc)
    if result.residual is not None:   # kept by the node for its next round of this run
        context.state[RESIDUAL_STATE] = weights_to_record(result.residual)
    sent = update_to_record(result.update) if result.update is not None else weights_to_record(result.weights)
    content = RecordDict({WEIGHTS_RECORD: sent,
                          RESULT_RECORD: json_record(district=district, num_samples=int(result.num_samples),
                                                      metrics=result.metrics, **extra)})
    return Message(content, reply_to=message)


@client_app.evaluate()
def client_evaluate(message: Message, context: Context) -> Message:
    """Loss and change metrics of the sent weights on one split of this node's pack."""
    try:
        weights = received(record_to_weights(message.content[WEIGHTS_RECORD]))
        setup = RoundSetup.from_dict(from_json_record(message.content[SETUP_RECORD], "setup"))
        split = from_json_record(message.content[SETUP_RECORD], "split")
        metrics = evaluate_weights(with_own_tensors(weights, setup, context, setup.round), setup,
                                   node_pack(context), split=split, env=node_environment(context))
    except Exception as exc:
        return _error_reply(message, exc)
    return Message(RecordDict({RESULT_RECORD: json_record(metrics=metrics)}), reply_to=message)





# ------------------------------------------------------------------------------------------ ServerApp

server_app = ServerApp()


def _echo(text: str) -> None:
    """A line of the run's output; what nodes send (their errors, their names) is shown escaped (printable)."""
    print(printable(text), flush=True)


def serve(grid: Grid, run_config: Mapping[str, object], echo: Callable[[str], None] = _echo):
    """Run (or resume) nfed's federation over the grid's SuperNodes; returns the FederationResult.

    RUN/status.json says running from the start (the run folder is held while the nodes connect), and
    failed with the reason if anything stops the run."""
    settings = settings_from_run_config(run_config)
    fed = settings.federation_config
    with recorded_run(settings.run_dir, resume=settings.resume, overwrite=settings.overwrite, rounds=fed.rounds,
                      echo=echo) as held:
        roster = Roster(settings.districts, echo=echo)
        clients = FlowerClients(grid, roster, timeout=fed.deadline, eval_timeout=settings.eval_deadline, echo=echo)
        clients.secagg_range = fed.secagg_range
        clients.broadcast = fed.broadcast
        clients.norm_policy = fed.norm_policy
        if settings.resume and fed.norm_policy != "shared":
            echo(f"note: --norm-policy {fed.norm_policy} over Flower: each district's BatchNorm lived in its node's "
                 "state for the previous run and starts afresh now (the shared weights resume exactly)")
        districts = clients.connect(max(settings.expected_nodes, fed.min_clients), settings.connect_timeout)
        # Under secure aggregation no training may travel ahead of its round: a prefetched reply is a plain update.
        clients.plan = None if fed.secure_aggregation else round_plan(districts, settings.train_config, fed)
        echo(f"federating {len(districts)} district(s) over Flower into {settings.run_dir}"
             + (" (resuming)" if settings.resume else ""))
        params = run_params("flower", train=settings.train_config, federation=fed) if settings.track is not None \
            else {}
        with tracked(settings.track, settings.run_dir, "flower", params, warn=echo) as tracker:
            result = federate(clients.pack_labels(), settings.run_dir, settings.train_config, fed,
                              resume=settings.resume, overwrite=settings.overwrite, echo=echo, held=held,
                              runner=clients, evaluate_fn=clients.evaluate,
                              data_fingerprint=clients.data_fingerprint(), tile=clients.tile(),
                              train_samples=AnnouncedCounts(roster),
                              on_round=tracker.log_round if tracker else None)
            if tracker:
                for row in result.results:
                    tracker.log_district(row)
                tracker.log_artifacts(settings.run_dir / name for name in ("summary.json", "federated.csv",
                                                                            "rounds.jsonl"))
    for row in result.results:
        echo(f"test {row['district']}: F1 {row['f1']:.4f} ({row['samples']} samples)"
             if not math.isnan(row["f1"]) else f"test {row['district']}: no result")
    echo(f"done: {result.stop_reason}; run folder {settings.run_dir}")
    return result


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    # nfed's warnings are echoed as lines of the run's output already; without a handler Python would print
    # each a second time on stderr, which `flwr run --stream` shows as well.
    logging.getLogger("nfed").addHandler(logging.NullHandler())
    try:
        serve(grid, context.run_config)
    except Exception as exc:
        # The one-line reason first (also in RUN/status.json); re-raised so Flower records the run as failed.
        _echo(f"nfed: error: {one_line(exc)}")
        raise
