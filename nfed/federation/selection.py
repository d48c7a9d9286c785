"""Which round's global model a federation keeps (RUN/best.h5, the federated column), decided round by round.

Rules, on the mean over districts of the global model's validation metrics of each evaluated round:
- `loss`: the lowest mean validation loss (the rule before issue 30);
- `f1`: the highest mean validation F1;
- `loss-ma` / `f1-ma`: the same on a trailing moving average over the last `window` evaluated rounds (full
  windows only: the first window-1 rounds are never kept, or the first round, alone in its window, could win on
  its own luck). The round kept is the LAST round of the best window, i.e. the round just finished when the
  window becomes the best: its weights are in hand then, so best.h5 is written at that moment like the plain
  rules (no past round's weights need keeping), and a resume replays the rule from rounds.jsonl alone.
No round of the first `warmup` rounds is kept (their values still fill a moving average's window): a model that
marks every pixel as change scores a fair F1 in round 1 on tiles with much change (LEVIR-CD: 0.33), the F1 twin
of the loss's all-background plateau. When no round can be kept, the federation scores its last round.
On small validation splits the loss is flat while F1 climbs (the all-background plateau) and both are noisy:
F1 follows what the table reports, and the moving average keeps one lucky round from deciding.
A round without a finite value of the rule's metric, or whose global model was not evaluated (an empty
`global_val`: its means are the clients' own), is skipped (it neither counts in a window nor is kept); ties keep
the earlier round.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from nfed.common.errors import ConfigError
from nfed.common.strict_json import is_finite_number as finite

RULES = ("loss", "f1", "loss-ma", "f1-ma")
METRICS = {"loss": "mean_val_loss", "f1": "mean_val_f1"}
MAX_WINDOW = 50


def check_rule(rule: str, window: int) -> None:
    """An unknown rule or a window outside 1..MAX_WINDOW is one ConfigError."""
    if rule not in RULES:
        raise ConfigError(f"--select-by must be one of {', '.join(RULES)}, got {rule}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ConfigError(f"--select-window must be a whole number in [1, {MAX_WINDOW}], got {window!r}")


def describe(rule: str, window: int) -> str:
    """The rule in words, for logs, summary.json readers and the report."""
    metric = "mean validation loss" if rule.startswith("loss") else "mean validation F1"
    extreme = "lowest" if rule.startswith("loss") else "highest"
    if rule.endswith("-ma"):
        return f"{extreme} {metric}, moving average over {window} rounds"
    return f"{extreme} {metric}"


@dataclass
class Selection:
    """The kept round so far under `rule`; `update` says whether the round just seen became the kept one
    (FederationConfig declares the defaults of rule, window and warm-up)."""

    rule: str
    window: int
    warmup: int = 0
    best_round: int = 0
    best_value: float = math.nan   # the rule's value (the metric or its moving average) at the kept round
    _recent: deque = field(default_factory=deque, repr=False)

    def __post_init__(self):
        check_rule(self.rule, self.window)
        self._recent = deque(maxlen=self.window if self.rule.endswith("-ma") else 1)

    @property
    def metric(self) -> str:
        """The round record's field the rule reads."""
        return METRICS[self.rule.split("-")[0]]

    def update(self, record: Mapping) -> bool:
        """See one round's record (its `round` and mean validation metrics); True when it becomes the kept one."""
        value = record.get(self.metric)
        if not finite(value) or record.get("global_val") == {}:   # {}: the means are the clients' own, not the global's
            return False
        self._recent.append(float(value))
        if len(self._recent) < self._recent.maxlen or int(record["round"]) <= self.warmup:
            return False
        score = sum(self._recent) / len(self._recent)
        lower = self.metric == "mean_val_loss"
        if self.best_round and not (score < self.best_value if lower else score > self.best_value):
            return False
        self.best_round, self.best_value = int(record["round"]), score
        return True

    @classmethod
    def replay(cls, rule: str, window: int, records: Iterable[Mapping], warmup: int = 0) -> "Selection":
        """The state after `records` (rounds.jsonl in order): what a resumed run continues from."""
        selection = cls(rule, window, warmup)
        for record in records:
            selection.update(record)
        return selection


def selection_of(config) -> Selection:
    """A fresh Selection under a FederationConfig's `select_by` / `select_window`, after its warm-up rounds."""
    return Selection(config.select_by, config.select_window, config.warmup_rounds)


def kept_round(rule: str, window: int, records: Iterable[Mapping], warmup: int = 0) -> int:
    """The round `rule` keeps among `records` (0 when none can be kept)."""
    return Selection.replay(rule, window, records, warmup).best_round
