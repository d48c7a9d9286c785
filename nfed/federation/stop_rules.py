"""When a federation ends: converged weights (norm-difference rule), a stalled validation loss, or the budget."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from nfed.common.errors import CheckpointError
from nfed.common.validate import check_fields, check_number


@dataclass
class StopRules:
    """When the federation ends: converged weights, stalled validation loss, or the round budget.

    eps: stop when ||w_{r+1} - w_r|| / ||w_r|| < eps (0 disables). patience_rounds/delta: stop when the
    validation loss has not improved by more than delta for that many rounds (0 disables). max_rounds: budget.
    warmup_rounds: neither rule fires in the first rounds, and their stale rounds do not count towards the
    patience: early on the validation loss can sit on the all-background plateau while F1 climbs (one demo
    seed stopped at round 8 with validation F1 rising from 0.12 to 0.39).
    """

    max_rounds: int = 20
    eps: float = 0.0
    patience_rounds: int = 0
    delta: float = 0.0
    warmup_rounds: int = 0
    best_val_loss: float = math.inf
    rounds_since_best: int = 0
    fired: str | None = None  # "norm", "val_loss" or "budget" once a rule has fired

    def __post_init__(self):
        self.max_rounds = check_number("rounds", self.max_rounds)
        check_fields(self, ("eps", "patience_rounds", "delta", "warmup_rounds"))

    def check(self, round_number: int, norm_difference: float | None, val_loss: float | None) -> str | None:
        """Record finished round `round_number` (1-based); the rule that fires, as a sentence, or None."""
        if val_loss is not None and math.isfinite(val_loss):
            if val_loss < self.best_val_loss - self.delta:
                self.best_val_loss = val_loss
                self.rounds_since_best = 0
            elif round_number > self.warmup_rounds:
                self.rounds_since_best += 1
        self.fired = None
        if round_number <= self.warmup_rounds:
            return f"round budget of {self.max_rounds} spent" if self._budget(round_number) else None
        if self.eps > 0 and norm_difference is not None and norm_difference < self.eps:
            self.fired = "norm"
            return (f"converged: relative norm difference {norm_difference:.3g} < eps {self.eps:g} "
                    f"after round {round_number}")
        if self.patience_rounds > 0 and self.rounds_since_best >= self.patience_rounds:
            self.fired = "val_loss"
            return (f"validation loss has not improved by more than {self.delta:g} for "
                    f"{self.rounds_since_best} round(s) (best {self.best_val_loss:.4f})")
        if self._budget(round_number):
            return f"round budget of {self.max_rounds} spent"
        return None

    def _budget(self, round_number: int) -> bool:
        if round_number >= self.max_rounds:
            self.fired = "budget"
            return True
        return False

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"best_val_loss": np.asarray(self.best_val_loss, dtype=np.float64),
                "rounds_since_best": np.asarray(self.rounds_since_best, dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            self.best_val_loss = float(np.asarray(state["best_val_loss"]))
            self.rounds_since_best = int(np.asarray(state["rounds_since_best"]))
        except KeyError as exc:
            raise CheckpointError(f"stop-rule state lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"stop-rule state is malformed ({exc})") from None
        if math.isnan(self.best_val_loss) or self.rounds_since_best < 0:
            raise CheckpointError("stop-rule state is malformed (NaN best loss or negative round count)")
