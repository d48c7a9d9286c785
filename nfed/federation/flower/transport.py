"""The transport of nfed's ServerApp: FlowerClients, the districts' SuperNodes seen as a federation runner
and evaluation function (the messages go out and come back through nfed.federation.flower.exchange).

Flower's cost is per message (the SuperNode polls every 3 s and starts a ClientApp process for each), so a
round's validation travels with the next round's training: one message per node and round instead of two.
A node that did not answer a round's training is not asked to evaluate it, and evaluation has its own
(shorter) deadline; a node the SuperLink reports unavailable is recorded as such, with the time it took.

Under --norm-policy fedbn / silobn only the shared tensors travel, both ways: each node keeps its district's own
BatchNorm in its Flower context state (nfed.federation.flower.app), so the server neither sends nor holds it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from nfed.common.errors import DataError, one_line
from nfed.federation import norm_policy
from nfed.federation.client import ClientOutcome, ClientResult, ClientTask, clean_metrics
from nfed.federation.round_setup import RoundSetup, make_round_setup
from nfed.federation.compression import broadcast
from nfed.federation.flower.exchange import POLL_SECONDS, TTL_SLACK_SECONDS, Reply, describe_nodes, exchange
from nfed.federation.flower.messages import (RESULT_RECORD, SETUP_RECORD, WEIGHTS_RECORD, WEIGHTS_SLACK_BYTES,
                                             evaluation_metrics, from_json_record, is_update_record, json_record,
                                             record_bytes, record_to_update, record_to_weights, weights_to_record)
from nfed.federation.roster import Roster
from nfed.federation.runners import select_clients

log = logging.getLogger(__name__)

DESCRIBE_SECONDS = 60.0           # a node that joins mid-run has this long to describe its pack
PACK_PREFIX = "flower:"           # the Federation's "pack" of a district served over Flower


@dataclass
class Prefetched:
    """A train message that travelled with the previous round's evaluation, and its reply; when the server
    streams, the outcome read from it on arrival (its update already folded into `stream`, its weights dropped)."""

    node_id: int
    setup: RoundSetup
    reply: Reply
    outcome: ClientOutcome | None = None


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

    `run_streaming` is `run` with the server's RoundStream (nfed.federation.streaming): each train reply is read,
    folded into the round's aggregator and its weights dropped as it arrives, and so are the replies that come
    with the previous round's evaluation (into the next round's stream, `open_stream`), so the ServerApp never
    holds more than one reply's weights. A stream opened early is used only if every update folded into it was
    sent with its round's real set-up; else it is dropped and those districts are asked again.
    """

    streams = True   # nfed.federation.server may hand `run_streaming` a RoundStream

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
        self.broadcast = "fp32"   # how the global model travels to the nodes (--broadcast)
        self.norm_policy = "shared"   # fedbn / silobn: the nodes keep their own BatchNorm, only the rest travels
        self.bytes_down = None    # bytes of the last weights record sent
        self._prefetched: tuple | None = None           # (weights, district -> Prefetched, next round's stream)
        self.open_stream: Callable | None = None        # (weights, round) -> the server's RoundStream, or None
        self.first_seen: dict[int, int] = {}            # node id -> the poll that first listed it
        self._polls = 0

    @property
    def refused_nodes(self) -> dict[int, str]:
        """SuperNodes left out now (node id -> why): an impostor, a node of another district, a broken one."""
        return dict(self.roster.refused)

    # -- the nodes
    def refresh(self, describe_timeout: float | None = None) -> None:
        """List the connected nodes again: forget those gone, have new ones describe their packs."""
        online = self._listed()
        self.roster.forget_offline(online)
        new = sorted(online - self.roster.known())
        if new:
            self.roster.admit(describe_nodes(self.grid, new, describe_timeout or self.describe_timeout),
                              self.first_seen)

    def _listed(self) -> set[int]:
        """The nodes the SuperLink lists now; each new one is stamped with this poll's number (first come)."""
        online = {int(node) for node in self.grid.get_node_ids()}
        self._polls += 1
        for node in online:
            self.first_seen.setdefault(node, self._polls)
        self.first_seen = {node: poll for node, poll in self.first_seen.items() if node in online}
        return online

    def connect(self, expected: int, timeout: float) -> list[str]:
        """Wait up to `timeout` s for `expected` nodes, have them describe their packs, and fix the run's
        districts (DataError when no node serves one); allowed districts without a node join when one comes."""
        started = time.monotonic()
        online = self._listed()
        while len(online) < expected and time.monotonic() - started < timeout:
            time.sleep(POLL_SECONDS)
            online = self._listed()
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

    def _message(self, node_id: int, message_type: str, weights_record: ArrayRecord, setup: RoundSetup,
                 round_number: int, timeout: float | None, **extra) -> Message:
        content = RecordDict({WEIGHTS_RECORD: weights_record,
                              SETUP_RECORD: json_record(setup=setup.to_dict(), **extra)})
        ttl = timeout + TTL_SLACK_SECONDS if timeout else None   # a message nobody waits for is not delivered
        return Message(content, dst_node_id=int(node_id), message_type=message_type, group_id=str(round_number),
                       ttl=ttl)

    encodes_broadcast = True   # the Federation hands over its float32 model; `broadcast` is applied here

    @property
    def keeps_local_state(self) -> bool:
        """True when each node keeps its district's own tensors (fedbn / silobn): the Federation holds none."""
        return self.norm_policy != "shared"

    def _weights_record(self, weights) -> ArrayRecord:
        """The global model's shared tensors as they travel (float16 under --broadcast fp16, training and
        evaluation alike); a reply may be as large as their float32 values."""
        weights = norm_policy.split(weights, self.norm_policy)[0]
        record = weights_to_record(broadcast(weights, self.broadcast))
        self.bytes_down = record_bytes(record)
        self._max_bytes = sum(int(v.size) * max(int(v.dtype.itemsize), 4) for v in weights.values()) \
            + WEIGHTS_SLACK_BYTES
        return record

    # -- runner interface of nfed.federation.server
    def run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None) -> list[ClientOutcome]:
        return self._run(global_weights, tasks, deadline, None)[0]

    def run_streaming(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None, stream):
        """`run` folding each ok outcome into `stream` as it arrives: (outcomes without their shared weights,
        the stream that holds their sum: `stream`, or the one opened with the previous round's evaluation)."""
        return self._run(global_weights, tasks, deadline, stream)

    def _run(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None, stream):
        timeout = deadline if deadline is not None else self.timeout
        self.refresh()
        self.silent, self._evaluated = {}, None
        prefetched, early = self._take_prefetched(global_weights)
        if stream is not None and early is not None and self._early_usable(early, prefetched, tasks, stream):
            stream = early
        elif early is not None:   # its sum cannot be used: every update folded into it is asked for again
            prefetched = {d: ready for d, ready in prefetched.items() if d not in early.folded}
        outcomes: dict[str, ClientOutcome] = {}
        messages, nodes = {}, {}
        record, used = None, 0
        for task in tasks:
            district = task.district
            ready = prefetched.get(district)
            read = ready is not None and ready.outcome is not None
            if ready is not None and ready.setup == task.setup and (
                    ready.node_id not in self.roster.refused or (read and ready.outcome.status != "ok")):
                outcome = ready.outcome if read else self._train_outcome(district, ready.node_id, ready.reply,
                                                                         timeout)
                if stream is not None and not read:
                    stream.add(outcome)
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
                                               task.setup.round, timeout)
        round_number = tasks[0].setup.round if tasks else 0
        if used:
            self.echo(f"round {round_number}: {used} SuperNode(s) trained with the previous round's evaluation"
                      + (f"; sending to {len(messages)} more" if messages else ""))
        if messages or not used:
            self.echo(f"sending round {round_number} to {len(messages)} SuperNode(s)"
                      + (f", deadline {timeout:g} s" if timeout else ""))
        def arrived(district: str, reply: Reply):
            return stream.add(self._train_outcome(district, nodes[district], reply, timeout))

        replies = exchange(self.grid, messages, timeout, on_reply=arrived if stream is not None else None) \
            if messages else {}
        for district in messages:
            reply = replies[district]
            outcomes[district] = reply if isinstance(reply, ClientOutcome) else \
                self._train_outcome(district, nodes[district], reply, timeout)
        return [outcomes[task.district] for task in tasks], stream

    def _early_usable(self, early, prefetched: Mapping[str, Prefetched], tasks: Sequence[ClientTask], stream) -> bool:
        """True when the stream opened with the previous round's evaluation holds only updates this round asked
        for: same round and model, each folded district a task of this round with the set-up it was sent."""
        setups = {task.district: task.setup for task in tasks}
        return early.round_number == stream.round_number and early.weights is stream.weights and all(
            district in setups and prefetched[district].setup == setups[district]
            and prefetched[district].node_id not in self.roster.refused for district in early.folded)

    def run_secure(self, global_weights, tasks: Sequence[ClientTask], deadline: float | None):
        """One round under Flower's SecAgg+ (nfed.federation.flower.secagg): outcomes and the revealed aggregate, never
        one node's update. A node weighs itself by its described training samples (1 each under DP-FedAvg)."""
        from nfed.federation.privacy import SecureAggregate
        from nfed.federation.flower.secagg import secure_round

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
        dp_clip = running[0].setup.dp_clip if running else 0.0
        expected = {d: 1 if dp_clip else int(node.samples.get("train", 0)) for d, node in self.roster.serving.items()}
        round_number = tasks[0].setup.round if tasks else 0
        self.echo(f"sending round {round_number} to {len(running)} SuperNode(s) under secure aggregation"
                  + (f", deadline {timeout:g} s per stage" if timeout else ""))
        aggregate = SecureAggregate(None, problem="no SuperNode to aggregate")
        if running:
            shared = norm_policy.split(global_weights, self.norm_policy)[0]   # the nodes keep the rest
            secured, aggregate = secure_round(self.grid, nodes, shared, running, timeout=timeout,
                                              bound=dp_clip or self.secagg_range, expected_weight=expected,
                                              echo=self.echo)
            outcomes.update({outcome.district: outcome for outcome in secured})
        return [outcomes[task.district] for task in tasks], aggregate

    def _take_prefetched(self, weights) -> tuple[dict[str, Prefetched], object]:
        """(district -> Prefetched, the stream their updates were folded into) for a round from `weights`."""
        prefetched, self._prefetched = self._prefetched, None
        return prefetched[1:] if prefetched is not None and prefetched[0] is weights else ({}, None)

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
            result = self._read_train_reply(district, reply.message)
        except Exception as exc:  # whatever a node sends, it can only fail itself, never the round
            reason = self._drop(district, node_id, f"bad reply: {one_line(exc)[:300]}")
            return ClientOutcome(district, "failed", reply.seconds, reason=reason)
        return ClientOutcome(district, "ok", reply.seconds, result=result)

    def _read_train_reply(self, district: str, message: Message) -> ClientResult:
        """Weights (or compressed update), sample count and metrics of a train reply that keeps to the protocol
        (DataError if not; a compressed update's contents are checked when the server decodes it)."""
        content = message.content
        result = content[RESULT_RECORD]
        answered_for = from_json_record(result, "district")
        if answered_for != district:
            raise DataError(f"it answered for {str(answered_for)[:40]!r}, not {district!r}")
        num_samples = from_json_record(result, "num_samples")
        node = self.roster.node_of(district) or self.roster.reference.get(district)
        described = node.samples.get("train") if node is not None else None
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0 or \
                (described is not None and num_samples != described):
            raise DataError(f"it claims {str(num_samples)[:20]} training samples"
                            + (f" but described {described}" if described is not None else ""))
        metrics = clean_metrics(from_json_record(result, "metrics"))
        record = content[WEIGHTS_RECORD]   # read in place: the server only reads a reply (no copy of the model)
        if is_update_record(record):
            return ClientResult({}, num_samples, metrics, bytes_up=record_bytes(record),
                                update=record_to_update(record, self._max_bytes, copy=False))
        return ClientResult(record_to_weights(record, self._max_bytes, copy=False), num_samples, metrics,
                            bytes_up=record_bytes(record))

    # -- evaluation function of nfed.federation.server
    def evaluate(self, weights, setup, pack_label, *, split: str = "val", env=None, local_state=None) -> dict:
        """A district's scores of `weights` (its node puts its own BatchNorm in place: `local_state` is the
        in-process runners', never sent)."""
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
            return evaluation_metrics(from_json_record(reply.message.content[RESULT_RECORD], key))
        except Exception as exc:
            reason = self._drop(district, node_id, f"bad evaluation reply: {one_line(exc)[:300]}")
            raise DataError(f"{district}: {reason}") from None

    def _evaluate_all(self, weights, setup, split: str):
        """Ask every district's node to evaluate (with the next round's training where planned); returns
        district -> (node, reply), district -> why it was not asked, district -> the time it was given."""
        self.refresh()
        round_number = setup.round
        if self.keeps_local_state:   # the node merges its own BatchNorm under the run's policy
            setup = setup.replace(norm_policy=self.norm_policy)
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
                                                   evaluate={"setup": setup.to_dict(), "split": split})
            else:
                timeouts[district] = self.eval_timeout
                messages[district] = self._message(node.node_id, MessageType.EVALUATE, record, setup, round_number,
                                                   self.eval_timeout, split=split)
        early = self.open_stream(weights, round_number + 1) if planned and self.open_stream is not None else None
        if planned:
            self.echo(f"evaluating round {round_number} together with round {round_number + 1}'s training")

        def arrived(district: str, reply: Reply) -> Reply:
            """The training that came with an evaluation, folded into the next round's stream now (not when its
            evaluation is malformed: the node is left out when it is read); only the result record is kept."""
            if district in planned and reply.error is None and self._readable_evaluation(reply):
                outcome = early.add(self._train_outcome(district, nodes[district], reply, self.timeout))
                prefetched[district] = Prefetched(nodes[district], planned[district], reply, outcome)
                if WEIGHTS_RECORD in reply.message.content:
                    del reply.message.content[WEIGHTS_RECORD]
            return reply

        replies = exchange(self.grid, messages, self.eval_timeout, timeouts=timeouts,
                           on_reply=arrived if early is not None else None) if messages else {}
        for district in planned:
            if district in replies and district not in prefetched:
                prefetched[district] = Prefetched(nodes[district], planned[district], replies[district])
        self._prefetched = (weights, prefetched, early) if prefetched else None
        return {d: (nodes[d], replies[d]) for d in messages}, skipped, timeouts

    @staticmethod
    def _readable_evaluation(reply: Reply) -> bool:
        try:
            evaluation_metrics(from_json_record(reply.message.content[RESULT_RECORD], "evaluation"))
        except Exception:  # noqa: BLE001 - read again (and the node left out) when the Federation asks for it
            return False
        return True


def round_plan(districts: Sequence[str], train_config, fed_config) -> Callable[[int], dict[str, RoundSetup]]:
    """round -> district -> the training set-up nfed.federation.server sends in that round (none past the budget):
    what FlowerClients may send ahead, with the previous round's evaluation. The runner checks each set-up
    against the round's real task before using a reply, so a plan that guessed wrong only costs time."""
    def plan(round_number: int) -> dict[str, RoundSetup]:
        if round_number > fed_config.rounds:
            return {}
        setup = make_round_setup(train_config, round_number, fed_config.local_epochs, prox_mu=fed_config.prox_mu,
                                 norm_policy=fed_config.norm_policy, compress=fed_config.compress)
        return {d: setup for d in select_clients(districts, fed_config.fraction, fed_config.seed, round_number)}
    return plan
