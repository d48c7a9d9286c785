"""JSON as the standard defines it: never NaN or Infinity, which other readers (and jq) reject.

A number that is not finite (a loss before any epoch, a ratio with nothing to divide) is written as null;
reading refuses the non-standard constants, so a damaged or hostile file cannot smuggle them back in. A
document nested deeper than Python's recursion limit is malformed JSON like any other (ValueError), not a
RecursionError that escapes every reader's `except ValueError`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from nfed.common.errors import DataError


def finite_or_none(value):
    """A copy of `value` with non-finite floats as None, NumPy scalars/arrays as Python values, tuples as lists."""
    if isinstance(value, dict):
        return {str(key): finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_finite_number(value) -> bool:
    """True for a JSON number nfed can compute with: int or float, not bool, finite as a float (json reads
    1e400 as inf, and a 400-digit integer does not fit a float at all)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def dumps(value, **options) -> str:
    """json.dumps of `finite_or_none(value)` that can never emit NaN or Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes):
    """json.loads that refuses NaN, Infinity and -Infinity and too deep nesting (ValueError, like any other
    malformed JSON)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_file(path: str | os.PathLike):
    """The JSON document in an input file; DataError naming the file when it is missing, unreadable or not
    valid JSON (including NaN and too deep nesting)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        return loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
