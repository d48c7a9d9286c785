"""Exchanging Flower messages with deadlines: push a batch, collect the replies each within its own time, and say
what became of a message its node never answered; and asking nodes to describe their packs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from nfed.common.errors import one_line
from nfed.federation.flower.messages import (DESCRIBE, RESULT_RECORD, SETUP_RECORD, check_description, from_json_record,
                                             json_record)

POLL_SECONDS = 0.25
TTL_SLACK_SECONDS = 30.0          # a message outlives its deadline by this much, then the SuperLink drops it


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
             poll_seconds: float = POLL_SECONDS, timeouts: Mapping[str, float | None] | None = None,
             on_reply: Callable[[str, Reply], object] | None = None) -> dict[str, Reply]:
    """Push `messages` (key -> message) and collect replies until all arrived or their time ran out.

    Returns a Reply for every key: `timeout` seconds (per key: `timeouts`) is how long a key is waited for;
    later replies are never read (each round asks only for the ids of its own messages, so a late update
    cannot slip into a later round). The SuperLink itself answers for a node that stopped sending heartbeats.
    With `on_reply`, each reply that arrives goes to on_reply(key, reply) at once, in message order within a
    poll, and what it returns is kept instead: a caller that folds a large reply in need not hold them all.
    """
    keys = list(messages)
    order = {key: index for index, key in enumerate(keys)}
    limits = {key: (timeouts or {}).get(key, timeout) for key in keys}
    started = time.monotonic()
    message_ids = list(grid.push_messages([messages[key] for key in keys]))
    replies = {key: Reply(None, 0.0, pushed=False) for key, message_id in zip(keys, message_ids) if not message_id}
    pending = {message_id: key for key, message_id in zip(keys, message_ids) if message_id}
    while pending:
        pulled = sorted(grid.pull_messages(list(pending)), reverse=True,
                        key=lambda reply: order.get(pending.get(reply.metadata.reply_to_message_id), -1))
        while pulled:   # popped one by one, so a reply handed to on_reply is not held by this list as well
            reply = pulled.pop()
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                replies[key] = Reply(reply, time.monotonic() - started)
                if on_reply is not None:
                    replies[key] = on_reply(key, replies[key])
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
    messages = {str(node): Message(RecordDict({SETUP_RECORD: json_record(action=DESCRIBE)}),
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
            claims[int(key)] = check_description(from_json_record(reply.message.content[RESULT_RECORD], "info"))
        except Exception as exc:  # a malformed description leaves that node out, never the run
            claims[int(key)] = one_line(exc)[:300]
    return claims
