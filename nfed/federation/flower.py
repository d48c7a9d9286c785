"""nfed's federated protocol over Flower: a ServerApp that runs nfed's Federation, a ClientApp per district.

The rounds, aggregation (FedAvg, FedAvgM, FedAdam), stop rules, min-clients, checkpoint/resume and the run
folder (global.h5, rounds.jsonl, federated.csv, status.json) are nfed.federation.server's, unchanged: this module
only supplies the transport, `FlowerClients`, which plays the role of the in-process runner and evaluation
function by sending Flower messages to the SuperNode of each district and waiting for the replies up to the
deadline. Which node serves which district is nfed.federation.roster's: the nodes are listed again before every exchange
(a restarted node rejoins, a dead one is noticed), and an allow-list (`districts`) keeps unplanned ones out.

Messages (flwr Message API, one SuperLink, one SuperNode per district):
- query:    server -> node: "describe"; node -> server: its district, tile size, split sizes (from its pack)
- train:    server -> node: global weights + the round's set-up (+ optionally the previous round's evaluation
            to do first); node -> server: weights, samples, metrics (+ that evaluation's metrics)
- evaluate: server -> node: global weights + set-up + split; node -> server: loss and change metrics
Weights travel as an ArrayRecord: one flat NumPy array per dtype and a manifest of parameter names and
shapes (Flower serialises arrays with np.save(allow_pickle=False) and cuts them into 5 MB chunks); the
set-up and metrics as JSON text. A node reads only the HDF5 pack named in its node config
(`pack="/data/Gangnam-gu.h5"`): the data never leaves it.

Flower's cost is per message (the SuperNode polls every 3 s and starts a ClientApp process for each), so a
round's validation travels with the next round's training: one message per node and round instead of two.
A node that did not answer a round's training is not asked to evaluate it, and evaluation has its own
(shorter) deadline; a node the SuperLink reports unavailable is recorded as such, with the time it took.

The run configuration ([tool.flwr.app.config], written by `nfed flower-app`) holds the federation options
(`rounds`, `deadline`, `eval-deadline`, `min-clients`, `districts`, ...) and, under `train.`, the full
TrainConfig the clients train with.
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
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from nfed.common import strict_json
from nfed.common.backend import to_numpy
from nfed.federation.client import (DP_CLIP_KEY, ClientOutcome, ClientResult, ClientTask, clean_metrics, evaluate_weights,
                     make_round_setup, one_line, train_round)
from nfed.common.errors import ConfigError, DataError
from nfed.federation.roster import Roster, parse_allow_list, valid_district_name
from nfed.common.validate import Limit, check_number

log = logging.getLogger(__name__)

WEIGHTS_RECORD = "weights"
SETUP_RECORD = "setup"
RESULT_RECORD = "result"
DESCRIBE = "describe"
CLIENT_ERROR_CODE = 7001
POLL_SECONDS = 0.25
DESCRIBE_SECONDS = 60.0           # a node that joins mid-run has this long to describe its pack
TTL_SLACK_SECONDS = 30.0          # a message outlives its deadline by this much, then the SuperLink drops it
PACK_PREFIX = "flower:"           # the Federation's "pack" of a district served over Flower
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
    "warmup-rounds": ("warmup_rounds", int),
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
OPTIONAL_KEYS = ("warmup-rounds", "aggregator", "trim-beta", "krum-f", "krum-m", "clip-factor", "max-sample-share",
                 "dp-clip", "dp-noise", "dp-delta", "secure-aggregation", "secagg-range")
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
    from nfed.data.reader import DistrictPack

    from nfed.federation.server import pack_fingerprint

    with DistrictPack(path) as pack:
        info = {"district": pack.district, "tile": int(pack.tile),
                "samples": {split: int(pack.num_samples(split)) for split in ("train", "val", "test")}}
    info["fingerprint"] = pack_fingerprint(path)
    return info


def pack_district(path: Path) -> str:
    """The district a pack holds (read from the pack; hashing it is for describe only)."""
    from nfed.data.reader import DistrictPack

    with DistrictPack(path) as pack:
        return pack.district


def check_description(info) -> dict:
    """A node's self-description as the server may rely on it (DataError for anything malformed)."""
    if not isinstance(info, dict):
        raise DataError("its description is not a JSON object")
    district, tile, samples = info.get("district"), info.get("tile"), info.get("samples")
    if not valid_district_name(district):
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
    """One round of local training on this node's pack with nfed.federation.client.train_round (or, under secure
    aggregation, one stage of Flower's SecAgg+ protocol around it: nfed.federation.secagg); when the set-up asks for it
    (`evaluate`: the previous round's evaluation travelling with this round), the received weights are first
    evaluated on that split, so one message does the work of two."""
    from nfed.federation.secagg import is_secure_message, secure_train

    if is_secure_message(message):
        try:
            return secure_train(message, context, node_pack, node_device)
        except Exception as exc:
            return _error_reply(message, exc)
    try:
        weights = record_to_weights(message.content[WEIGHTS_RECORD])
        setup = _from_json_record(message.content[SETUP_RECORD], "setup")
        pack, device = node_pack(context), node_device(context)
        extra = {}
        if "evaluate" in message.content[SETUP_RECORD]:
            evaluation = _from_json_record(message.content[SETUP_RECORD], "evaluate")
            extra["evaluation"] = evaluate_weights(weights, evaluation["setup"], pack, split=evaluation["split"],
                                                   device=device)
        result = train_round(weights, setup, pack, device=device)
        district = pack_district(pack)
    except Exception as exc:
        return _error_reply(message, exc)
    content = RecordDict({WEIGHTS_RECORD: weights_to_record(result.weights),
                          RESULT_RECORD: _json_record(district=district, num_samples=int(result.num_samples),
                                                      metrics=result.metrics, **extra)})
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
    """One node's answer to one message (None: none came) and when it arrived, or how long was waited for it;
    `pushed` is False when the SuperLink refused the message (its node is no longer registered)."""

    message: Message | None
    seconds: float
    pushed: bool = True

    @property
    def error(self) -> str | None:
        if self.message is None:
            return None
        if self.message.has_error():
            return self.message.error.reason or f"Flower error {self.message.error.code}"
        return None

    @property
    def unavailable(self) -> bool:
        """The SuperLink answered for the node: it stopped sending heartbeats (or left) before replying."""
        return self.message is not None and self.message.has_error() \
            and self.message.error.code == ErrorCode.NODE_UNAVAILABLE

    def silence(self, node_id: int, timeout: float | None) -> str | None:
        """What became of a message its node never answered, in words (None when it did answer)."""
        if not self.pushed:
            return f"SuperNode {node_id} could not be reached (the SuperLink no longer lists it)"
        if self.unavailable:
            return f"SuperNode {node_id} unavailable after {self.seconds:.1f} s (its heartbeats stopped)"
        if self.message is None:
            return f"no answer within the {timeout:g} s deadline" if timeout else "no answer"
        return None


def exchange(grid: Grid, messages: Mapping[str, Message], timeout: float | None,
             poll_seconds: float = POLL_SECONDS, timeouts: Mapping[str, float | None] | None = None
             ) -> dict[str, Reply]:
    """Push `messages` (key -> message) and collect replies until all arrived or their time ran out.

    Returns a Reply for every key: `timeout` seconds (per key: `timeouts`) is how long a key is waited for;
    later replies are never read (each round asks only for the ids of its own messages, so a late update
    cannot slip into a later round). The SuperLink itself answers for a node that stopped sending heartbeats.
    """
    keys = list(messages)
    limits = {key: (timeouts or {}).get(key, timeout) for key in keys}
    started = time.monotonic()
    message_ids = list(grid.push_messages([messages[key] for key in keys]))
    replies = {key: Reply(None, 0.0, pushed=False) for key, message_id in zip(keys, message_ids) if not message_id}
    pending = {message_id: key for key, message_id in zip(keys, message_ids) if message_id}
    while pending:
        for reply in grid.pull_messages(list(pending)):
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                replies[key] = Reply(reply, time.monotonic() - started)
        elapsed = time.monotonic() - started
        for message_id, key in list(pending.items()):
            if limits[key] is not None and elapsed >= limits[key]:
                replies[key] = Reply(None, elapsed)
                del pending[message_id]
        if pending:
            time.sleep(poll_seconds)
    return {key: replies[key] for key in keys}


def describe_nodes(grid: Grid, node_ids: Sequence[int], timeout: float) -> dict[int, dict | str]:
    """node id -> its checked description, or why it gave none (no answer, an error, a malformed one)."""
    messages = {str(node): Message(RecordDict({SETUP_RECORD: _json_record(action=DESCRIBE)}),
                                   dst_node_id=int(node), message_type=MessageType.QUERY, group_id="describe",
                                   ttl=timeout + TTL_SLACK_SECONDS)
                for node in node_ids}
    claims: dict[int, dict | str] = {}
    for key, reply in exchange(grid, messages, timeout).items():
        silence = reply.silence(int(key), timeout)
        if silence is not None or reply.error is not None:
            claims[int(key)] = silence or str(reply.error)[:300]
            continue
        try:
            claims[int(key)] = check_description(_from_json_record(reply.message.content[RESULT_RECORD], "info"))
        except Exception as exc:  # a malformed description leaves that node out, never the run
            claims[int(key)] = one_line(exc)[:300]
    return claims


@dataclass
class Prefetched:
    """A train message that travelled with the previous round's evaluation, and its reply."""

    node_id: int
    setup: dict
    reply: Reply


class FlowerClients:
    """The districts' SuperNodes as nfed.federation.server sees its clients: a runner and an evaluation function.

    Before every exchange the connected nodes are listed again and new ones describe their packs (a
    restarted district takes part in the next round); nfed.federation.roster decides which node serves which district.
    `run(weights, tasks, deadline)` sends one train message per task to its district's node and turns the
    replies into ClientOutcomes in task order (so FedAvg sums in the same order every time): `late` when
    the deadline passed, `failed` with what happened otherwise (an error, a node gone or unavailable).
    `evaluate(weights, setup, pack, split=...)` is called per district by the Federation; the first call for
    a given model and split asks every node at once, within the evaluation deadline, and the others are
    answered from that exchange. A node that did not answer this round's training is not asked.

    With `plan` (round -> district -> set-up of that round's training), the validation of round r travels
    with round r+1's training in one message per node (Flower's cost is per message: a ClientApp process and
    the SuperNode's polling); `run` then finds those replies ready. Nothing changes in the arithmetic: the
    node evaluates the weights it received before it trains from them.
    """

    def __init__(self, grid: Grid, roster: Roster, *, timeout: float | None, eval_timeout: float | None,
                 echo: Callable[[str], None] = print, plan: Callable[[int], Mapping[str, dict]] | None = None,
                 describe_timeout: float = DESCRIBE_SECONDS):
        self.grid = grid
        self.roster = roster
        self.timeout = timeout
        self.eval_timeout = eval_timeout
        self.echo = echo
        self.plan = plan
        self.describe_timeout = describe_timeout
        self.silent: dict[str, tuple[int, str]] = {}   # district -> (node, what happened) in this round's training
        self._max_bytes: int | None = None
        self._evaluated: tuple | None = None
        self.secagg_range = 8.0   # secure aggregation: coordinates clipped to +-this before quantisation
        self._prefetched: tuple | None = None           # (weights, district -> Prefetched)

    # -- the nodes
    def refresh(self, describe_timeout: float | None = None) -> None:
        """List the connected nodes again: forget those gone, have new ones describe their packs."""
        online = {int(node) for node in self.grid.get_node_ids()}
        self.roster.forget_offline(online)
        new = sorted(online - self.roster.known())
        if new:
            self.roster.admit(describe_nodes(self.grid, new, describe_timeout or self.describe_timeout))

    def connect(self, expected: int, timeout: float) -> list[str]:
        """Wait up to `timeout` s for `expected` nodes, have them describe their packs, and fix the run's
        districts (DataError when no node serves one); allowed districts without a node join when one comes."""
        started = time.monotonic()
        online = list(self.grid.get_node_ids())
        while len(online) < expected and time.monotonic() - started < timeout:
            time.sleep(POLL_SECONDS)
            online = list(self.grid.get_node_ids())
        if len(online) < expected:
            self.echo(f"only {len(online)} of {expected} expected SuperNode(s) connected after {timeout:g} s")
        if not online:
            raise DataError(f"no SuperNode connected to the SuperLink after {timeout:g} s")
        self.refresh(max(timeout - (time.monotonic() - started), 30.0))
        if self.roster.missing():
            self.echo(f"no SuperNode serves {', '.join(self.roster.missing())} yet (a district takes part once one "
                      "does)")
        if not self.roster.serving:
            raise DataError("no SuperNode could describe its district pack")
        return self.roster.start()

    def data_fingerprint(self) -> dict[str, str | None]:
        """district -> the pack hash its node reported (what a resume must find again)."""
        return {d: getattr(self.roster.reference.get(d), "fingerprint", None) for d in self.roster.districts or ()}

    def tile(self) -> int | None:
        """The tile size of the nodes' packs (the roster admits only one)."""
        return self.roster.tile

    def pack_labels(self) -> dict[str, str]:
        """district -> where its data lives, for the Federation (the server never opens these packs)."""
        return {district: f"{PACK_PREFIX}{district}" for district in self.roster.districts or ()}

    def _district_of(self, pack_label) -> str:
        label = str(pack_label)
        if label.startswith(PACK_PREFIX) and label[len(PACK_PREFIX):] in (self.roster.districts or ()):
            return label[len(PACK_PREFIX):]
        raise DataError(f"{label}: not a district of this Flower run")

    def _drop(self, district: str, node_id: int, reason: str) -> str:
        """Leave a node that broke the protocol out (while it stays connected), and say so once."""
        self.roster.drop(district, node_id, reason)
        return reason

    def _message(self, node_id: int, message_type: str, weights_record: ArrayRecord, setup: Mapping,
                 round_number: int, timeout: float | None, **extra) -> Message:
        content = RecordDict({WEIGHTS_RECORD: weights_record, SETUP_RECORD: _json_record(setup=dict(setup), **extra)})
        ttl = timeout + TTL_SLACK_SECONDS if timeout else None   # a message nobody waits for is not delivered
        return Message(content, dst_node_id=int(node_id), message_type=message_type, group_id=str(round_number),
                       ttl=ttl)

    def _weights_record(self, weights) -> ArrayRecord:
        record = weights_to_record(weights)
        self._max_bytes = record_bytes(record) + WEIGHTS_SLACK_BYTES
        return record

    # -- runner interface of nfed.federation.server
    def run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None) -> list[ClientOutcome]:
        timeout = deadline if deadline is not None else self.timeout
        self.refresh()
        self.silent, self._evaluated = {}, None
        prefetched = self._take_prefetched(global_weights)
        outcomes: dict[str, ClientOutcome] = {}
        messages, nodes = {}, {}
        record, used = None, 0
        for task in tasks:
            district = task.district
            ready = prefetched.get(district)
            if ready is not None and ready.setup == dict(task.setup) and ready.node_id not in self.roster.refused:
                outcome = self._train_outcome(district, ready.node_id, ready.reply, timeout)
                serving = self.roster.node_of(district)
                if outcome.status == "ok" or serving is None or serving.node_id == ready.node_id:
                    outcomes[district] = outcome
                    used += 1
                    continue
                self.silent.pop(district, None)   # a standby took over: it gets this round's message afresh
            node = self.roster.node_of(district)
            if node is None:
                outcomes[district] = ClientOutcome(district, "failed", reason=self.roster.why_unserved(district))
                continue
            record = record if record is not None else self._weights_record(global_weights)
            nodes[district] = node.node_id
            messages[district] = self._message(node.node_id, MessageType.TRAIN, record, task.setup,
                                               int(task.setup.get("round", 0)), timeout)
        round_number = int(tasks[0].setup.get("round", 0)) if tasks else 0
        if used:
            self.echo(f"round {round_number}: {used} SuperNode(s) trained with the previous round's evaluation"
                      + (f"; sending to {len(messages)} more" if messages else ""))
        if messages or not used:
            self.echo(f"sending round {round_number} to {len(messages)} SuperNode(s)"
                      + (f", deadline {timeout:g} s" if timeout else ""))
        replies = exchange(self.grid, messages, timeout) if messages else {}
        for district in messages:
            outcomes[district] = self._train_outcome(district, nodes[district], replies[district], timeout)
        return [outcomes[task.district] for task in tasks]

    def run_secure(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None):
        """One round under Flower's SecAgg+ (nfed.federation.secagg): outcomes and the revealed aggregate, never one
        node's update. A node weighs itself by its described training samples (1 each under DP-FedAvg)."""
        from nfed.federation.privacy import SecureAggregate
        from nfed.federation.secagg import secure_round

        timeout = deadline if deadline is not None else self.timeout
        self.refresh()
        self.silent, self._evaluated, self._prefetched = {}, None, None
        outcomes: dict[str, ClientOutcome] = {}
        running, nodes = [], {}
        for task in tasks:
            node = self.roster.node_of(task.district)
            if node is None:
                outcomes[task.district] = ClientOutcome(task.district, "failed",
                                                        reason=self.roster.why_unserved(task.district))
            else:
                running.append(task)
                nodes[task.district] = node.node_id
        dp_clip = float(running[0].setup.get(DP_CLIP_KEY) or 0.0) if running else 0.0
        expected = {d: 1 if dp_clip else int(node.samples.get("train", 0)) for d, node in self.roster.serving.items()}
        round_number = int(tasks[0].setup.get("round", 0)) if tasks else 0
        self.echo(f"sending round {round_number} to {len(running)} SuperNode(s) under secure aggregation"
                  + (f", deadline {timeout:g} s per stage" if timeout else ""))
        aggregate = SecureAggregate(None, problem="no SuperNode to aggregate")
        if running:
            secured, aggregate = secure_round(self.grid, nodes, global_weights, running, timeout=timeout,
                                              bound=dp_clip or self.secagg_range, expected_weight=expected,
                                              echo=self.echo)
            outcomes.update({outcome.district: outcome for outcome in secured})
        return [outcomes[task.district] for task in tasks], aggregate

    def _take_prefetched(self, weights) -> dict[str, Prefetched]:
        prefetched, self._prefetched = self._prefetched, None
        return prefetched[1] if prefetched is not None and prefetched[0] is weights else {}

    def _train_outcome(self, district: str, node_id: int, reply: Reply, timeout: float | None) -> ClientOutcome:
        silence = reply.silence(node_id, timeout)
        if silence is not None:
            self.silent[district] = (node_id, silence)
            self.roster.missed(district, silence)
            late = reply.pushed and reply.message is None
            return ClientOutcome(district, "late" if late else "failed", reply.seconds, reason=silence)
        if reply.error is not None:
            return ClientOutcome(district, "failed", reply.seconds, reason=str(reply.error)[:500])
        try:
            weights, num_samples, metrics = self._read_train_reply(district, reply.message)
        except Exception as exc:  # whatever a node sends, it can only fail itself, never the round
            reason = self._drop(district, node_id, f"bad reply: {one_line(exc)[:300]}")
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
        node = self.roster.node_of(district) or self.roster.reference.get(district)
        described = node.samples.get("train") if node is not None else None
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0 or \
                (described is not None and num_samples != described):
            raise DataError(f"it claims {str(num_samples)[:20]} training samples"
                            + (f" but described {described}" if described is not None else ""))
        metrics = clean_metrics(_from_json_record(result, "metrics"))
        weights = record_to_weights(content[WEIGHTS_RECORD], self._max_bytes)
        return weights, num_samples, metrics

    # -- evaluation function of nfed.federation.server
    def evaluate(self, weights, setup, pack_label, *, split: str = "val", device=None) -> dict:
        district = self._district_of(pack_label)
        if self._evaluated is None or self._evaluated[0] is not weights or self._evaluated[1] != split:
            self._evaluated = (weights, split, *self._evaluate_all(weights, setup, split))
        _, _, replies, skipped, timeouts = self._evaluated
        if district in skipped:
            raise DataError(f"{district}: {skipped[district]}")
        node_id, reply = replies[district]
        silence = reply.silence(node_id, timeouts[district])
        if silence is not None:
            raise DataError(f"{district}: no evaluation: {silence}")
        if reply.error is not None:
            raise DataError(f"{district}: {str(reply.error)[:500]}")
        try:
            key = "evaluation" if reply.message.metadata.message_type == MessageType.TRAIN else "metrics"
            return evaluation_metrics(_from_json_record(reply.message.content[RESULT_RECORD], key))
        except Exception as exc:
            reason = self._drop(district, node_id, f"bad evaluation reply: {one_line(exc)[:300]}")
            raise DataError(f"{district}: {reason}") from None

    def _evaluate_all(self, weights, setup, split: str):
        """Ask every district's node to evaluate (with the next round's training where planned); returns
        district -> (node, reply), district -> why it was not asked, district -> the time it was given."""
        self.refresh()
        round_number = int(setup.get("round", 0))
        planned = (self.plan(round_number + 1) or {}) if self.plan is not None and split == "val" else {}
        record = self._weights_record(weights)
        messages, nodes, skipped, timeouts, prefetched = {}, {}, {}, {}, {}
        for district in self.roster.districts or ():
            node = self.roster.node_of(district)
            if node is None:
                skipped[district] = self.roster.why_unserved(district)
                continue
            silent = self.silent.get(district)
            if split == "val" and silent is not None and silent[0] == node.node_id:
                skipped[district] = f"not asked to evaluate: in this round's training, {silent[1]}"
                continue
            nodes[district] = node.node_id
            if district in planned:
                timeouts[district] = self.timeout
                messages[district] = self._message(node.node_id, MessageType.TRAIN, record, planned[district],
                                                   round_number + 1, self.timeout,
                                                   evaluate={"setup": dict(setup), "split": split})
            else:
                timeouts[district] = self.eval_timeout
                messages[district] = self._message(node.node_id, MessageType.EVALUATE, record, setup, round_number,
                                                   self.eval_timeout, split=split)
        if planned:
            self.echo(f"evaluating round {round_number} together with round {round_number + 1}'s training")
        replies = exchange(self.grid, messages, self.eval_timeout, timeouts=timeouts) if messages else {}
        for district in planned:
            if district in replies:
                prefetched[district] = Prefetched(nodes[district], dict(planned[district]), replies[district])
        self._prefetched = (weights, prefetched) if prefetched else None
        return {d: (nodes[d], replies[d]) for d in messages}, skipped, timeouts


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


def round_plan(districts: Sequence[str], train_config, fed_config) -> Callable[[int], dict[str, dict]]:
    """round -> district -> the training set-up nfed.federation.server sends in that round (none past the budget):
    what FlowerClients may send ahead, with the previous round's evaluation. The runner checks each set-up
    against the round's real task before using a reply, so a plan that guessed wrong only costs time."""
    from nfed.federation.server import select_clients

    def plan(round_number: int) -> dict[str, dict]:
        if round_number > fed_config.rounds:
            return {}
        setup = make_round_setup(train_config, round_number, fed_config.local_epochs)
        return {d: setup for d in select_clients(districts, fed_config.fraction, fed_config.seed, round_number)}
    return plan


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
    eval_deadline: float | None = None      # seconds an evaluation waits for the nodes (None: for all)
    districts: list[str] | None = None      # the allow-list (None: any district)


def run_config_for(train_config, fed_config, *, run_dir: Path, resume: bool = False, overwrite: bool = False,
                   expected_nodes: int = 0, connect_timeout: float = 300.0, eval_deadline: float | None = None,
                   districts: Sequence[str] | None = None) -> dict:
    """The nested [tool.flwr.app.config] table for a TrainConfig + FederationConfig (TOML-friendly): the
    evaluation deadline defaults to the training deadline, and 0 waits for every node; an empty `districts`
    admits any district."""
    federation = fed_config.to_dict()
    if federation.get("client_state", "reset") != "reset":
        raise ConfigError("over Flower each round starts the clients' optimisers afresh (--client-state reset)")
    if federation.get("simulate_attack") is not None:
        raise ConfigError("--simulate-attack is a testing switch of nfed federate, not of a Flower deployment")
    if districts and fed_config.min_clients > len(districts):
        raise ConfigError(f"--min-clients {fed_config.min_clients} exceeds the {len(districts)} district(s) of "
                          "--districts")
    if eval_deadline is None:
        eval_deadline = fed_config.deadline
    config = {"run-dir": str(Path(run_dir).expanduser().resolve()), "resume": bool(resume),
              "overwrite": bool(overwrite), "expected-nodes": int(expected_nodes),
              "connect-timeout": float(connect_timeout), "eval-deadline": float(eval_deadline or 0.0),
              "districts": ",".join(districts or ())}
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
    from nfed.federation.server import FederationConfig
    from nfed.training.trainer import TrainConfig

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
    eval_deadline = check_number("eval-deadline", get("eval-deadline", float, options["deadline"] or 0.0),
                                 "flower_deadline")
    districts = str(get("districts", str, ""))
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
        eval_deadline=eval_deadline or None,
        districts=parse_allow_list(districts.split(","), "Flower run config 'districts'") if districts else None,
    )


# ------------------------------------------------------------------------------------------ ServerApp

server_app = ServerApp()


def _echo(text: str) -> None:
    print(text, flush=True)


def serve(grid: Grid, run_config: Mapping[str, object], echo: Callable[[str], None] = _echo):
    """Run (or resume) nfed's federation over the grid's SuperNodes; returns the FederationResult.

    RUN/status.json says running from the start (the run folder is held while the nodes connect), and
    failed with the reason if anything stops the run."""
    from nfed.federation.server import federate, recorded_run

    settings = settings_from_run_config(run_config)
    fed = settings.federation_config
    with recorded_run(settings.run_dir, resume=settings.resume, overwrite=settings.overwrite, rounds=fed.rounds):
        roster = Roster(settings.districts, echo=echo)
        clients = FlowerClients(grid, roster, timeout=fed.deadline, eval_timeout=settings.eval_deadline, echo=echo)
        clients.secagg_range = fed.secagg_range
        districts = clients.connect(max(settings.expected_nodes, fed.min_clients), settings.connect_timeout)
        # Under secure aggregation no training may travel ahead of its round: a prefetched reply is a plain update.
        clients.plan = None if fed.secure_aggregation else round_plan(districts, settings.train_config, fed)
        echo(f"federating {len(districts)} district(s) over Flower into {settings.run_dir}"
             + (" (resuming)" if settings.resume else ""))
        result = federate(clients.pack_labels(), settings.run_dir, settings.train_config, fed,
                          resume=settings.resume, overwrite=settings.overwrite, echo=echo, runner=clients,
                          evaluate_fn=clients.evaluate, data_fingerprint=clients.data_fingerprint(),
                          tile=clients.tile(),
                          train_samples={d: int(node.samples.get("train", 0))
                                         for d, node in roster.reference.items()})
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
