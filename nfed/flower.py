"""nfed's federated protocol over Flower: a ServerApp that runs nfed's Federation, a ClientApp per district.

The rounds, aggregation (FedAvg, FedAvgM, FedAdam), stop rules, min-clients, checkpoint/resume and the run
folder (global.h5, rounds.jsonl, federated.csv) are nfed.federation's, unchanged: this module only supplies
the transport, `FlowerClients`, which plays the role of the in-process runner and evaluation function by
sending Flower messages to one SuperNode per district and waiting for the replies up to the deadline.

Messages (flwr Message API, one SuperLink, one SuperNode per district):
- query:    server -> node: "describe"; node -> server: its district, tile size, split sizes (from its pack)
- train:    server -> node: global weights + the round's set-up; node -> server: weights, samples, metrics
- evaluate: server -> node: global weights + set-up + split; node -> server: loss and change metrics
Weights travel as an ArrayRecord: one flat NumPy array per dtype and a manifest of parameter names and
shapes (Flower serialises arrays with np.save(allow_pickle=False) and cuts them into 5 MB chunks); the
set-up and metrics as JSON text. A node reads only
the HDF5 pack named in its node config (`pack="/data/Gangnam-gu.h5"`): the data never leaves it.

The run configuration ([tool.flwr.app.config], written by `nfed flower-app`) holds the federation options
(`rounds`, `deadline`, `min-clients`, ...) and, under `train.`, the full TrainConfig the clients train with.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import strict_json
from .backend import to_numpy
from .client import (DP_CLIP_KEY, ClientOutcome, ClientResult, ClientTask, clean_metrics, evaluate_weights,
                     one_line, train_round)
from .districts import district_order_key
from .errors import ConfigError, DataError, NfedError
from .validate import Limit, check_number

log = logging.getLogger(__name__)

WEIGHTS_RECORD = "weights"
SETUP_RECORD = "setup"
RESULT_RECORD = "result"
DESCRIBE = "describe"
CLIENT_ERROR_CODE = 7001
POLL_SECONDS = 0.25
NODE_PREFIX = "flower-node:"
MANIFEST_KEY = "manifest"
PACKED_PREFIX = "packed."
NUMERIC_KINDS = "biuf"
MAX_TEXT_BYTES = 1 << 20          # set-up, metrics and descriptions are small JSON texts
WEIGHTS_SLACK_BYTES = 1 << 20     # .npy headers and the manifest on top of the model's own bytes

SPLITS = ("train", "val", "test")
COUNT_LIMIT = Limit(0, 10**9, integer=True)

# Run-config keys of the federation options (TOML-friendly: no None; 0 means "unset" where noted).
FEDERATION_KEYS = {
    "rounds": ("rounds", int),
    "local-epochs": ("local_epochs", int),
    "eps": ("eps", float),
    "patience-rounds": ("patience_rounds", int),
    "delta": ("delta", float),
    "deadline": ("deadline", float),          # seconds; 0: wait for every client
    "fraction": ("fraction", float),
    "min-clients": ("min_clients", int),
    "server-opt": ("server_opt", str),
    "server-lr": ("server_lr", float),        # 0: the server optimiser's usual default
    "server-momentum": ("server_momentum", float),
    "seed": ("seed", int),
    "evaluate-rounds": ("evaluate_rounds", bool),
    # defences: optional in the run config (apps written before them keep working)
    "aggregator": ("aggregator", str),
    "trim-beta": ("trim_beta", float),
    "krum-f": ("krum_f", int),
    "krum-m": ("krum_m", int),
    "clip-factor": ("clip_factor", float),
    "max-sample-share": ("max_sample_share", float),
    "dp-clip": ("dp_clip", float),
    "dp-noise": ("dp_noise", float),
    "dp-delta": ("dp_delta", float),          # 0: 1 / the districts' training samples
    "secure-aggregation": ("secure_aggregation", bool),
    "secagg-range": ("secagg_range", float),
}
OPTIONAL_KEYS = ("aggregator", "trim-beta", "krum-f", "krum-m", "clip-factor", "max-sample-share", "dp-clip",
                 "dp-noise", "dp-delta", "secure-aggregation", "secagg-range")
TRAIN_PREFIX = "train."


# ------------------------------------------------------------------------------------------ weights

def weights_to_record(weights: Mapping[str, object]) -> ArrayRecord:
    """The weights as an ArrayRecord: one flat NumPy array per dtype plus a manifest of names and shapes.

    Flower moves every Array (and each of its 5 MB chunks) as an object of its own, one HTTP request per
    object per hop; W-Net-CD's ~240 named arrays made one round trip take over a minute on a loaded
    loopback, one packed array per dtype takes seconds. Names travel in the manifest, so nothing depends
    on order. CuPy arrays are copied to the host first; nothing is pickled (Flower stores np.save bytes).
    """
    groups: dict[str, list[np.ndarray]] = {}
    manifest = []
    for name, value in weights.items():
        array = np.asarray(to_numpy(value))
        if array.dtype.kind not in NUMERIC_KINDS:
            raise DataError(f"cannot send '{name}': dtype {array.dtype} is not numeric")
        group = groups.setdefault(array.dtype.str, [])
        manifest.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape),
                         "offset": int(sum(a.size for a in group))})
        group.append(array.ravel())
    record = ArrayRecord()
    record[MANIFEST_KEY] = Array(np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8))
    for dtype, arrays in groups.items():
        record[PACKED_PREFIX + dtype] = Array(np.concatenate(arrays) if arrays else np.zeros(0, dtype))
    return record


def record_bytes(record) -> int:
    """Bytes of a record's payload as received (array bytes, or text of a config record), before decoding."""
    if isinstance(record, ArrayRecord):
        return sum(len(array.data) for array in record.values())
    if isinstance(record, ConfigRecord):
        return sum(len(str(key)) + len(str(value)) for key, value in record.items())
    raise DataError(f"unexpected record of type {type(record).__name__}")


def record_to_weights(record: ArrayRecord, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """name -> NumPy array from `weights_to_record`'s packing (DataError when the record is inconsistent or,
    with `max_bytes`, larger than that: a reply cannot be bigger than the model it carries)."""
    if not isinstance(record, ArrayRecord):
        raise DataError(f"unreadable weights record (a {type(record).__name__}, not an ArrayRecord)")
    if max_bytes is not None and record_bytes(record) > max_bytes:
        raise DataError(f"weights record of {record_bytes(record)} bytes exceeds the model's {max_bytes}")
    try:
        manifest = strict_json.loads(record[MANIFEST_KEY].numpy().tobytes().decode("utf-8"))
        if not isinstance(manifest, list):
            raise ValueError("the manifest is not a list")
        packed = {key[len(PACKED_PREFIX):]: record[key].numpy() for key in record if key.startswith(PACKED_PREFIX)}
        weights = {}
        for entry in manifest:
            dtype = np.dtype(entry["dtype"])
            flat = packed[entry["dtype"]]
            size = int(np.prod(entry["shape"], dtype=np.int64))
            offset = int(entry["offset"])
            if dtype.kind not in NUMERIC_KINDS or flat.dtype != dtype or offset < 0 or offset + size > flat.size:
                raise ValueError(f"entry '{entry['name']}' does not fit its packed {flat.dtype} array")
            weights[str(entry["name"])] = flat[offset:offset + size].reshape(entry["shape"]).copy()
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable weights record ({str(exc)[:200]})") from None
    return weights


def _json_record(**values) -> ConfigRecord:
    return ConfigRecord({key: strict_json.dumps(value, sort_keys=True) for key, value in values.items()})


def _from_json_record(record: ConfigRecord, key: str):
    if not isinstance(record, ConfigRecord):
        raise DataError(f"Flower message has a {type(record).__name__} where a config record was expected")
    if record_bytes(record) > MAX_TEXT_BYTES:
        raise DataError(f"Flower message's config record exceeds {MAX_TEXT_BYTES} bytes")
    try:
        return strict_json.loads(str(record[key]))
    except (KeyError, ValueError) as exc:
        raise DataError(f"Flower message lacks a readable '{key}' entry ({str(exc)[:200]})") from None


# ------------------------------------------------------------------------------------------ ClientApp

client_app = ClientApp()


def node_pack(context: Context) -> Path:
    """The HDF5 pack named in this SuperNode's node config (`--node-config 'pack="/data/X.h5"'`)."""
    pack = context.node_config.get("pack")
    if not pack:
        raise ConfigError("this SuperNode has no pack: start it with --node-config 'pack=\"/path/District.h5\"'")
    return Path(str(pack)).expanduser()


def node_device(context: Context) -> str:
    """The node's compute device: node config `device`, else $NFED_DEVICE, else cpu (not the server's)."""
    return str(context.node_config.get("device") or os.environ.get("NFED_DEVICE") or "cpu")


def _error_reply(message: Message, exc: BaseException) -> Message:
    log.error("nfed client failed: %s", one_line(exc))
    return Message(Error(code=CLIENT_ERROR_CODE, reason=one_line(exc)), reply_to=message)


def describe_pack(path: Path) -> dict:
    """What a node tells the server about its data: district name, tile size and split sizes (no data)."""
    from .data import DistrictPack

    from .federation import pack_fingerprint

    with DistrictPack(path) as pack:
        info = {"district": pack.district, "tile": int(pack.tile),
                "samples": {split: int(pack.num_samples(split)) for split in ("train", "val", "test")}}
    info["fingerprint"] = pack_fingerprint(path)
    return info


def check_description(info) -> dict:
    """A node's self-description as the server may rely on it (DataError for anything malformed)."""
    if not isinstance(info, dict):
        raise DataError("its description is not a JSON object")
    district, tile, samples = info.get("district"), info.get("tile"), info.get("samples")
    if not isinstance(district, str) or not 0 < len(district) <= 100 or not district.isprintable() \
            or "/" in district or district.startswith("."):
        raise DataError(f"its district name {str(district)[:40]!r} is not a valid name")
    try:
        check_number("tile", tile)
        counts = {split: check_number(f"{split} samples", samples[split], COUNT_LIMIT) for split in SPLITS}
    except (ConfigError, KeyError, TypeError) as exc:
        raise DataError(f"its description of {district} is malformed ({str(exc)[:120]})") from None
    fingerprint = info.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or len(fingerprint) > 100):
        raise DataError(f"its description of {district} has a malformed fingerprint")
    return {"district": district, "tile": tile, "samples": counts, "fingerprint": fingerprint}


@client_app.query()
def client_describe(message: Message, context: Context) -> Message:
    try:
        info = describe_pack(node_pack(context))
    except Exception as exc:  # the reason travels back as one line; the node keeps serving
        return _error_reply(message, exc)
    return Message(RecordDict({RESULT_RECORD: _json_record(info=info)}), reply_to=message)


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    """One round of local training on this node's pack with nfed.client.train_round (or, under secure
    aggregation, one stage of Flower's SecAgg+ protocol around it: nfed.secagg)."""
    from .secagg import is_secure_message, secure_train

    if is_secure_message(message):
        try:
            return secure_train(message, context, node_pack, node_device)
        except Exception as exc:
            return _error_reply(message, exc)
    try:
        weights = record_to_weights(message.content[WEIGHTS_RECORD])
        setup = _from_json_record(message.content[SETUP_RECORD], "setup")
        pack = node_pack(context)
        result = train_round(weights, setup, pack, device=node_device(context))
        district = describe_pack(pack)["district"]
    except Exception as exc:
        return _error_reply(message, exc)
    content = RecordDict({WEIGHTS_RECORD: weights_to_record(result.weights),
                          RESULT_RECORD: _json_record(district=district, num_samples=int(result.num_samples),
                                                      metrics=result.metrics)})
    return Message(content, reply_to=message)


@client_app.evaluate()
def client_evaluate(message: Message, context: Context) -> Message:
    """Loss and change metrics of the sent weights on one split of this node's pack."""
    try:
        weights = record_to_weights(message.content[WEIGHTS_RECORD])
        setup = _from_json_record(message.content[SETUP_RECORD], "setup")
        split = _from_json_record(message.content[SETUP_RECORD], "split")
        metrics = evaluate_weights(weights, setup, node_pack(context), split=split, device=node_device(context))
    except Exception as exc:
        return _error_reply(message, exc)
    return Message(RecordDict({RESULT_RECORD: _json_record(metrics=metrics)}), reply_to=message)


# ------------------------------------------------------------------------------------------ transport

@dataclass
class Reply:
    """One node's answer to one message: its content (or error reason) and when it arrived."""

    message: Message | None
    seconds: float

    @property
    def error(self) -> str | None:
        if self.message is None:
            return None
        if self.message.has_error():
            return self.message.error.reason or f"Flower error {self.message.error.code}"
        return None


def exchange(grid: Grid, messages: Mapping[str, Message], timeout: float | None,
             poll_seconds: float = POLL_SECONDS) -> dict[str, Reply]:
    """Push `messages` (key -> message) and collect replies until all arrived or `timeout` seconds passed.

    Returns key -> Reply for the nodes that answered in time; later replies are never read (each round asks
    only for the ids of its own messages, so a late update cannot slip into a later round).
    """
    keys = list(messages)
    started = time.monotonic()
    message_ids = list(grid.push_messages([messages[key] for key in keys]))
    pending = {message_id: key for key, message_id in zip(keys, message_ids) if message_id}
    replies: dict[str, Reply] = {}
    while pending:
        for reply in grid.pull_messages(list(pending)):
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                replies[key] = Reply(reply, time.monotonic() - started)
        if not pending or (timeout is not None and time.monotonic() - started >= timeout):
            break
        time.sleep(poll_seconds)
    return replies


class FlowerClients:
    """The districts' SuperNodes as nfed.federation sees its clients: a runner and an evaluation function.

    `run(weights, tasks, deadline)` sends one train message per task (to the node of task.district) and
    turns the replies into ClientOutcomes in task order (so FedAvg sums in the same order every time);
    nodes that do not answer within the deadline are `late`, error replies `failed`.
    `evaluate(weights, setup, pack, split=...)` is called per district by the Federation; the first call for
    a given model and split asks every node at once and the others are answered from that exchange.
    """

    def __init__(self, grid: Grid, nodes: Mapping[str, int], *, timeout: float | None,
                 echo: Callable[[str], None] = print, described: Mapping[str, dict] | None = None):
        self.grid = grid
        self.nodes = dict(nodes)
        self.timeout = timeout
        self.echo = echo
        self.described = dict(described or {})
        self.dropped: dict[str, str] = {}   # district -> why its node is left out for the rest of the run
        self._max_bytes: int | None = None
        self._evaluated: tuple | None = None
        self.secagg_range = 8.0   # secure aggregation: coordinates clipped to +-this before quantisation

    def data_fingerprint(self) -> dict[str, str | None]:
        """district -> the pack hash its node reported (what a resume must find again)."""
        return {d: self.described.get(d, {}).get("fingerprint") for d in self.nodes}

    def tile(self) -> int | None:
        """The tile size every node reported (None when they differ or none did)."""
        tiles = {info.get("tile") for info in self.described.values()}
        return tiles.pop() if len(tiles) == 1 else None

    def _drop(self, district: str, reason: str) -> str:
        """Leave a node that broke the protocol out of the rest of the run, and say so once."""
        if district not in self.dropped:
            self.dropped[district] = reason
            log.warning("SuperNode of %s left out for the rest of the run: %s", district, reason)
            self.echo(f"SuperNode {self.nodes.get(district)} ({district}) left out for the rest of the run: {reason}")
        return reason

    def pack_labels(self) -> dict[str, str]:
        """district -> where its data lives, for the Federation (the server never opens these packs)."""
        return {district: f"{NODE_PREFIX}{node_id}" for district, node_id in self.nodes.items()}

    def _message(self, node_id: int, message_type: str, weights_record: ArrayRecord, setup: Mapping,
                 round_number: int, **extra) -> Message:
        content = RecordDict({WEIGHTS_RECORD: weights_record, SETUP_RECORD: _json_record(setup=dict(setup), **extra)})
        return Message(content, dst_node_id=int(node_id), message_type=message_type, group_id=str(round_number))

    # -- runner interface of nfed.federation
    def run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None) -> list[ClientOutcome]:
        timeout = deadline if deadline is not None else self.timeout
        record = weights_to_record(global_weights)
        self._max_bytes = record_bytes(record) + WEIGHTS_SLACK_BYTES
        messages = {}
        outcomes: dict[str, ClientOutcome] = {}
        for task in tasks:
            node_id = self.nodes.get(task.district)
            if node_id is None:
                outcomes[task.district] = ClientOutcome(task.district, "failed", reason="no SuperNode connected")
                continue
            if task.district in self.dropped:
                outcomes[task.district] = ClientOutcome(task.district, "failed", reason=(
                    f"left out for the rest of the run: {self.dropped[task.district]}"))
                continue
            messages[task.district] = self._message(node_id, MessageType.TRAIN, record, task.setup,
                                                    int(task.setup.get("round", 0)))
        round_number = int(tasks[0].setup.get("round", 0)) if tasks else 0
        self.echo(f"sending round {round_number} to {len(messages)} SuperNode(s)"
                  + (f", deadline {timeout:g} s" if timeout else ""))
        replies = exchange(self.grid, messages, timeout) if messages else {}
        for district in messages:
            outcomes[district] = self._train_outcome(district, replies.get(district), timeout)
        return [outcomes[task.district] for task in tasks]

    def run_secure(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None):
        """One round under Flower's SecAgg+ (nfed.secagg): outcomes and the revealed aggregate, never one
        node's update. A node weighs itself by its described training samples (1 each under DP-FedAvg)."""
        from .privacy import SecureAggregate
        from .secagg import secure_round

        timeout = deadline if deadline is not None else self.timeout
        outcomes: dict[str, ClientOutcome] = {}
        running = []
        for task in tasks:
            if task.district not in self.nodes or task.district in self.dropped:
                outcomes[task.district] = ClientOutcome(task.district, "failed", reason=self.dropped.get(
                    task.district, "no SuperNode connected"))
            else:
                running.append(task)
        dp_clip = float(running[0].setup.get(DP_CLIP_KEY) or 0.0) if running else 0.0
        expected = {d: 1 if dp_clip else int(self.described.get(d, {}).get("samples", {}).get("train", 0))
                    for d in self.nodes}
        round_number = int(tasks[0].setup.get("round", 0)) if tasks else 0
        self.echo(f"sending round {round_number} to {len(running)} SuperNode(s) under secure aggregation"
                  + (f", deadline {timeout:g} s per stage" if timeout else ""))
        aggregate = SecureAggregate(None, problem="no SuperNode to aggregate")
        if running:
            secured, aggregate = secure_round(self.grid, self.nodes, global_weights, running, timeout=timeout,
                                              bound=dp_clip or self.secagg_range, expected_weight=expected,
                                              echo=self.echo)
            outcomes.update({outcome.district: outcome for outcome in secured})
        return [outcomes[task.district] for task in tasks], aggregate

    def _train_outcome(self, district: str, reply: Reply | None, timeout: float | None) -> ClientOutcome:
        if reply is None:
            return ClientOutcome(district, "late", float(timeout or 0.0),
                                 reason=f"no answer within the {timeout:g} s deadline" if timeout else "no answer")
        if reply.error is not None:
            return ClientOutcome(district, "failed", reply.seconds, reason=str(reply.error)[:500])
        try:
            weights, num_samples, metrics = self._read_train_reply(district, reply.message)
        except Exception as exc:  # whatever a node sends, it can only fail itself, never the round
            reason = self._drop(district, f"bad reply: {one_line(exc)[:300]}")
            return ClientOutcome(district, "failed", reply.seconds, reason=reason)
        return ClientOutcome(district, "ok", reply.seconds, result=ClientResult(weights, num_samples, metrics))

    def _read_train_reply(self, district: str, message: Message):
        """Weights, sample count and metrics of a train reply that keeps to the protocol (DataError if not)."""
        content = message.content
        result = content[RESULT_RECORD]
        answered_for = _from_json_record(result, "district")
        if answered_for != district:
            raise DataError(f"it answered for {str(answered_for)[:40]!r}, not {district!r}")
        num_samples = _from_json_record(result, "num_samples")
        described = self.described.get(district, {}).get("samples", {}).get("train")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0 or \
                (described is not None and num_samples != described):
            raise DataError(f"it claims {str(num_samples)[:20]} training samples"
                            + (f" but described {described}" if described is not None else ""))
        metrics = clean_metrics(_from_json_record(result, "metrics"))
        weights = record_to_weights(content[WEIGHTS_RECORD], self._max_bytes)
        return weights, num_samples, metrics

    # -- evaluation function of nfed.federation
    def evaluate(self, weights, setup, pack_label, *, split: str = "val", device=None) -> dict:
        district = self._district_of(pack_label)
        cached = self._evaluated
        if cached is None or cached[0] is not weights or cached[1] != split:
            record = weights_to_record(weights)
            round_number = int(setup.get("round", 0))
            messages = {d: self._message(node, MessageType.EVALUATE, record, setup, round_number, split=split)
                        for d, node in self.nodes.items() if d not in self.dropped}
            self._evaluated = cached = (weights, split, exchange(self.grid, messages, self.timeout))
        if district in self.dropped:
            raise DataError(f"{district}: left out for the rest of the run: {self.dropped[district]}")
        reply = cached[2].get(district)
        if reply is None:
            raise DataError(f"{district}: no evaluation answer within {self.timeout:g} s" if self.timeout
                            else f"{district}: no evaluation answer")
        if reply.error is not None:
            raise DataError(f"{district}: {str(reply.error)[:500]}")
        try:
            return evaluation_metrics(_from_json_record(reply.message.content[RESULT_RECORD], "metrics"))
        except Exception as exc:
            raise DataError(f"{district}: {self._drop(district, f'bad evaluation reply: {one_line(exc)[:300]}')}") \
                from None

    def _district_of(self, pack_label) -> str:
        label = str(pack_label)
        for district, node_id in self.nodes.items():
            if label == f"{NODE_PREFIX}{node_id}":
                return district
        raise DataError(f"{label}: not a connected SuperNode")


def evaluation_metrics(metrics) -> dict:
    """A node's evaluation metrics as the server records them: finite numbers, loss and f1 present."""
    clean = clean_metrics(metrics)
    for key in ("loss", "f1"):
        if not isinstance(clean.get(key), (int, float)) or isinstance(clean.get(key), bool):
            raise DataError(f"its metrics lack a finite '{key}'")
    for key in ("samples", "pack_samples"):
        if key in clean:
            clean[key] = check_number(key, clean[key], COUNT_LIMIT)
    return clean


def discover_districts(grid: Grid, *, expected_nodes: int, timeout: float,
                       echo: Callable[[str], None] = print) -> dict[str, dict]:
    """district -> description (node_id, tile, samples, fingerprint) of the connected SuperNodes, in the
    study's table order.

    Waits up to `timeout` seconds for `expected_nodes` SuperNodes, then asks each for its district. Nodes
    that do not answer, cannot read their pack or answer malformed descriptions are reported and left out;
    when two nodes claim the same district neither can be trusted, and both are left out.
    """
    started = time.monotonic()
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected_nodes and time.monotonic() - started < timeout:
        time.sleep(POLL_SECONDS)
        node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < expected_nodes:
        echo(f"only {len(node_ids)} of {expected_nodes} expected SuperNode(s) connected after {timeout:g} s")
    if not node_ids:
        raise DataError(f"no SuperNode connected to the SuperLink after {timeout:g} s")
    messages = {str(node): Message(RecordDict({SETUP_RECORD: _json_record(action=DESCRIBE)}),
                                   dst_node_id=int(node), message_type=MessageType.QUERY, group_id="describe")
                for node in node_ids}
    remaining = max(timeout - (time.monotonic() - started), 30.0)
    replies = exchange(grid, messages, remaining)
    claims: dict[str, list[dict]] = {}
    for key in messages:
        reply = replies.get(key)
        if reply is None or reply.error is not None:
            echo(f"SuperNode {key} left out: " + (str(reply.error)[:300] if reply is not None else "did not answer"))
            continue
        try:
            info = check_description(_from_json_record(reply.message.content[RESULT_RECORD], "info"))
        except Exception as exc:  # a malformed description leaves that node out, never the run
            echo(f"SuperNode {key} left out: {one_line(exc)[:300]}")
            continue
        claims.setdefault(info["district"], []).append({**info, "node_id": int(key)})
    nodes: dict[str, dict] = {}
    for district, claimants in claims.items():
        if len(claimants) > 1:
            ids = ", ".join(str(c["node_id"]) for c in claimants)
            echo(f"SuperNodes {ids} all claim district '{district}': all left out (register only one node "
                 "per district)")
            continue
        info = nodes[district] = claimants[0]
        echo(f"SuperNode {info['node_id']}: {district} (tile {info['tile']}, "
             + ", ".join(f"{split} {n}" for split, n in info["samples"].items()) + ")")
    if not nodes:
        raise DataError("no SuperNode could describe its district pack")
    return {district: nodes[district] for district in sorted(nodes, key=district_order_key)}


# ------------------------------------------------------------------------------------------ run config

@dataclass
class FlowerRunSettings:
    """Everything a Flower run of nfed needs, read from the run configuration."""

    run_dir: Path
    resume: bool
    overwrite: bool
    expected_nodes: int
    connect_timeout: float
    train_config: object
    federation_config: object


def run_config_for(train_config, fed_config, *, run_dir: Path, resume: bool = False, overwrite: bool = False,
                   expected_nodes: int = 0, connect_timeout: float = 300.0) -> dict:
    """The nested [tool.flwr.app.config] table for a TrainConfig + FederationConfig (TOML-friendly)."""
    federation = fed_config.to_dict()
    if federation.get("client_state", "reset") != "reset":
        raise ConfigError("over Flower each round starts the clients' optimisers afresh (--client-state reset)")
    if federation.get("simulate_attack") is not None:
        raise ConfigError("--simulate-attack is a testing switch of nfed federate, not of a Flower deployment")
    config = {"run-dir": str(Path(run_dir).expanduser().resolve()), "resume": bool(resume),
              "overwrite": bool(overwrite), "expected-nodes": int(expected_nodes),
              "connect-timeout": float(connect_timeout)}
    for key, (field_name, kind) in FEDERATION_KEYS.items():
        value = federation[field_name]
        config[key] = kind(0 if value is None else value)
    train = train_config.to_dict()
    train.pop("device", None)  # each node trains on its own device (node config `device`)
    train.pop("seed", None)    # one seed for the federation and the model: `seed` above
    config["train"] = train
    return config


def settings_from_run_config(run_config: Mapping[str, object]) -> FlowerRunSettings:
    """Parse the flat run configuration Flower hands the ServerApp (ConfigError naming a bad key)."""
    from .federation import FederationConfig
    from .training import TrainConfig

    def get(key, kind, default=None):
        if key not in run_config:
            if default is None:
                raise ConfigError(f"Flower run config lacks '{key}' (write the app with `nfed flower-app`)")
            return default
        try:
            return kind(run_config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"Flower run config '{key}' = {run_config[key]!r} is not a {kind.__name__}") from None

    defaults = {field.name: field.default for field in dataclasses.fields(FederationConfig)}
    options = {field_name: get(key, kind, kind(defaults[field_name] or 0) if key in OPTIONAL_KEYS else None)
               for key, (field_name, kind) in FEDERATION_KEYS.items()}
    for name in ("deadline", "server_lr", "dp_delta"):   # 0 in TOML: unset
        if options[name] <= 0:
            options[name] = None
    train = {key[len(TRAIN_PREFIX):]: value for key, value in run_config.items() if key.startswith(TRAIN_PREFIX)}
    train["seed"] = options["seed"]
    unknown = set(train) - set(TrainConfig().to_dict())
    if unknown:
        raise ConfigError(f"Flower run config has unknown training key(s): {', '.join(sorted(unknown))}")
    return FlowerRunSettings(
        run_dir=Path(get("run-dir", str)).expanduser(),
        resume=bool(get("resume", bool, False)),
        overwrite=bool(get("overwrite", bool, False)),
        expected_nodes=check_number("expected-nodes", get("expected-nodes", int, 0), "expected_nodes"),
        connect_timeout=check_number("connect-timeout", get("connect-timeout", float, 300.0), "connect_timeout"),
        train_config=TrainConfig.from_dict(train),
        federation_config=FederationConfig(**options),
    )


# ------------------------------------------------------------------------------------------ ServerApp

server_app = ServerApp()


def _echo(text: str) -> None:
    print(text, flush=True)


def serve(grid: Grid, run_config: Mapping[str, object], echo: Callable[[str], None] = _echo):
    """Run (or resume) nfed's federation over the grid's SuperNodes; returns the FederationResult."""
    from .federation import federate

    settings = settings_from_run_config(run_config)
    fed = settings.federation_config
    expected = max(settings.expected_nodes, fed.min_clients)
    described = discover_districts(grid, expected_nodes=expected, timeout=settings.connect_timeout, echo=echo)
    clients = FlowerClients(grid, {d: info["node_id"] for d, info in described.items()}, timeout=fed.deadline,
                            echo=echo, described=described)
    clients.secagg_range = fed.secagg_range
    echo(f"federating {len(described)} district(s) over Flower into {settings.run_dir}"
         + (" (resuming)" if settings.resume else ""))
    result = federate(clients.pack_labels(), settings.run_dir, settings.train_config, fed,
                      resume=settings.resume, overwrite=settings.overwrite, echo=echo, runner=clients,
                      evaluate_fn=clients.evaluate, data_fingerprint=clients.data_fingerprint(),
                      tile=clients.tile(), train_samples={d: info["samples"]["train"] for d, info in described.items()})
    for row in result.results:
        echo(f"test {row['district']}: F1 {row['f1']:.4f} ({row['samples']} samples)"
             if not math.isnan(row["f1"]) else f"test {row['district']}: no result")
    echo(f"done: {result.stop_reason}; run folder {settings.run_dir}")
    return result


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    try:
        serve(grid, context.run_config)
    except NfedError as exc:
        # The one-line reason first; re-raised so Flower records the run as failed with that reason.
        _echo(f"nfed: error: {exc}")
        raise
