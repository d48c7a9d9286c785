"""Aggregating a round's replies as they arrive (issue 26): the server's memory is that of one running sum and
one reply in flight, whatever the number of districts, instead of every reply held until the round's last.

A transport that can stream (FlowerClients: `streams = True`) hands each train outcome to a RoundStream the
moment it is read; the stream decodes it, caps its claim, folds it into the round's aggregator and drops its
weights. Only the cap at the count a district announced (or registered) applies then, as it needs no other
district's claim. Replies are held until the round's last, as before, when the aggregation needs all of them:
a robust aggregator (median, trimmed mean, multi-Krum, clipped: every update at once) or --max-sample-share < 1
(each claim is capped against the others'). FedAvg and DP-FedAvg stream.

Sum order: a held round sums in task order; a streamed one in the order the replies arrive (within one poll, in
message order). The float64 running sums then differ in their last bits only, so the float32 average differs
from the task-ordered one by at most one unit in the last place in a few coordinates
(tests/test_streaming_aggregation.py).
"""
from __future__ import annotations

from typing import Callable, Mapping

from nfed.federation.aggregator import FedAvgAggregator
from nfed.federation.client import ClientOutcome


def holds_replies(config, aggregator) -> str | None:
    """Why a round must hold every reply before aggregating (None: it can fold each one as it arrives)."""
    if not isinstance(aggregator, FedAvgAggregator):
        return f"the {aggregator.name} aggregator needs every update at once"
    if config.max_sample_share < 1.0:
        return f"--max-sample-share {config.max_sample_share:g} caps each claim against all the others"
    return None


class RoundStream:
    """One round's aggregation fed one outcome at a time.

    `fold(outcome)` (the server's: decode, cap, check, aggregator.add) takes an ok outcome in and returns what
    the round records of its cap ({district: (weight, why)} or {}); `add` calls it, then keeps only the tensors
    that stay with the district, so the reply's shared weights are freed as soon as they are summed.
    """

    def __init__(self, round_number: int, weights, aggregator, fold: Callable[[ClientOutcome], dict]):
        self.round_number = round_number
        self.weights = weights            # the global model the round trains from (which replies belong here)
        self.aggregator = aggregator
        self.capped: dict[str, tuple] = {}
        self.folded: list[str] = []       # districts whose update went into the sum (accepted or rejected)
        self._fold = fold

    def add(self, outcome: ClientOutcome) -> ClientOutcome:
        result = outcome.result
        if outcome.status == "ok" and result is not None:
            self.capped.update(self._fold(outcome))
            self.folded.append(outcome.district)
            result = outcome.result   # the fold may have replaced it (a simulated attacker's)
        if result is not None:
            weights = result.weights if isinstance(result.weights, Mapping) else {}
            result.weights = {name: value for name, value in weights.items() if name not in self.aggregator.reference}
            result.update = None
        return outcome
