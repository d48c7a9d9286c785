"""Progress on stderr for long work (silent when disabled), and the elapsed time and time left that long
commands print, so a user can plan with them."""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import click

T = TypeVar("T")


def progress(iterable: Iterable[T], *, label: str = "", length: int | None = None,
             enabled: bool = True) -> Iterator[T]:
    """Iterate with a click progress bar on stderr (no bar when `enabled` is False)."""
    if not enabled:
        yield from iterable
        return
    with click.progressbar(iterable, length=length, label=label, file=sys.stderr,
                           show_pos=True, show_eta=True) as bar:
        yield from bar


def duration(seconds: float) -> str:
    """A span of time as people read it: 42 s, 3.5 min, 1.2 h."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Countdown:
    """Elapsed time and what is left of `total` units of work (districts), told after each unit: the wall time per
    unit so far times the units left, so work running side by side on a pool is counted as it ran. No estimate
    before the first unit is done; units of different sizes make it an estimate ("about")."""

    def __init__(self, total: int, unit: str = "districts", clock: Callable[[], float] = time.monotonic):
        self.total, self.unit, self.clock = int(total), unit, clock
        self.start, self.done = clock(), 0

    def step(self) -> str:
        """Count one unit done; the line to show: '3/25 districts done, 1.2 min elapsed, about 8.8 min left'."""
        self.done += 1
        elapsed = self.clock() - self.start
        line = f"{self.done}/{self.total} {self.unit} done, {duration(elapsed)} elapsed"
        left = self.total - self.done
        if left > 0:
            line += f", about {duration(elapsed / self.done * left)} left"
        return line


def rounds_left(seconds: Sequence[float], done: int, budget: int, *, patience: int = 0, stale: int = 0,
                warmup: int = 0) -> str:
    """How long `done` rounds took (their `seconds`) and what is left: at most the rest of the round budget at
    the mean time of the last five rounds; with a validation-loss rule (`patience` rounds without improvement
    after `warmup`, `stale` of them seen), the least it can be. Rounds end on a rule, so only bounds are honest."""
    text = f"{duration(sum(seconds))} elapsed"
    if not seconds or done >= budget:
        return text
    per_round = sum(seconds[-5:]) / len(seconds[-5:])
    left = budget - done
    text += f", left at most {duration(left * per_round)} ({left} round{'s' if left != 1 else ''} of the budget)"
    earliest = max(done, warmup) + patience - stale
    if patience > 0 and earliest < budget:
        text += (f", at least {duration((earliest - done) * per_round)} (loss rule: {stale}/{patience} rounds "
                 "without improvement)")
    return text
