"""Numbers from users and files are finite and inside documented bounds, or fail in one line.

One table of limits serves the click options (nfed.commands.options.limited) and the config dataclasses
(nfed.common.fields.check_declared, `check_fields`), so `--lr inf` on the command line and
`TrainConfig(lr=float("inf"))` in Python fail alike, naming the option or field, the value and the accepted range.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from nfed.common.errors import ConfigError


@dataclass(frozen=True)
class Limit:
    """A closed or half-open interval of finite numbers; `integer` also demands a whole number."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        shown = (lambda bound: str(int(bound))) if self.integer else (lambda bound: f"{bound:g}")
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {shown(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {shown(self.high)}")
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def check(self, name: str, value, shown: str | None = None):
        """`value` (int when `integer`, else float) when it lies in range; ConfigError naming `name` if not."""
        problem = f"{name} {shown or repr(value)}: must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(problem)
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(problem)
        if self.integer:
            if number != int(number):
                raise ConfigError(problem)
            value = int(value)
        else:
            value = number
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            raise ConfigError(problem)
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            raise ConfigError(problem)
        return value

    def parse(self, name: str, text: str):
        """A number from command-line text, then `check`ed."""
        try:
            value = int(text) if self.integer else float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} {text!r}: must be {self.describe()}") from None
        return self.check(name, value, shown=str(text))


SEED_MAX = 2**32 - 1
SECONDS_MAX = 1e7        # about 115 days: any longer wait is a typo
SEED = Limit(0, SEED_MAX, integer=True)

# The accepted values of every numeric option and config field, by field name (CLI option: dashes). The fields
# of the config dataclasses (TrainConfig, FederationConfig) declare their own limits (nfed.common.fields.option)
# and join this table when their class is defined; here are the other numbers.
LIMITS: dict[str, Limit] = {
    "seed": SEED,
    "client_speed": Limit(0, 1e6, low_open=True),
    "gpu": Limit(0, 1023, integer=True),
    "epsilon": Limit(0, 1e6, low_open=True),
    # data
    "scale": Limit(0, 100, low_open=True),
    "tile": Limit(16, 8192, integer=True),
    "min_per_district": Limit(1, 10**6, integer=True),
    "jobs": Limit(0, 1024, integer=True),
    "eval_tiles": Limit(0, 10**6, integer=True),
    "seeds": Limit(1, 1000, integer=True),
    "split_fraction": Limit(0, 1),
    # Flower
    "expected_nodes": Limit(0, 100000, integer=True),
    "connect_timeout": Limit(0, SECONDS_MAX, low_open=True),
    "flower_deadline": Limit(0, SECONDS_MAX),   # 0: wait for every node
    # benchmarks
    "repeat": Limit(1, 10000, integer=True),
    "warmup": Limit(0, 10000, integer=True),
    "threads": Limit(1, 1024, integer=True),
    "models": Limit(1, 10000, integer=True),
    "parameters": Limit(1, 1e11),
    "cprofile_top": Limit(0, 1000, integer=True),
}


def check_number(name: str, value, limit: str | Limit | None = None):
    """`value` checked against LIMITS[limit] (default: the limit named `name`)."""
    key = limit if limit is not None else name
    return (key if isinstance(key, Limit) else LIMITS[key]).check(name, value)


def check_fields(obj, names, optional: tuple[str, ...] = ()) -> None:
    """Check (and normalise in place) the dataclass fields `names` of `obj`; `optional` ones may be None."""
    for name in names:
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        setattr(obj, name, check_number(name, value))
