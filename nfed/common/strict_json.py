"""JSON as the standard defines it: never NaN or Infinity, which other readers (and jq) reject.

A number that is not finite (a loss before any epoch, a ratio with nothing to divide) is written as null;
reading refuses the non-standard constants, so a damaged or hostile file cannot smuggle them back in.
"""
from __future__ import annotations

import json
import math

import numpy as np


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


def dumps(value, **options) -> str:
    """json.dumps of `finite_or_none(value)` that can never emit NaN or Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: str | bytes):
    """json.loads that refuses NaN, Infinity and -Infinity (ValueError, like any other malformed JSON)."""
    return json.loads(text, parse_constant=_reject_constant)
