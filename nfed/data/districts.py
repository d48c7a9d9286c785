"""The study's 25 Seoul districts (SEED.md Table 4): sample counts and F1 values, from data/districts.csv.

The CSV drives the synthetic generator (how many tiles each district gets), the order of packs and the
report that compares nfed's results with the study's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from nfed.common.csvtable import read_csv_rows
from nfed.common.errors import DataError
from nfed.common.resources import data_file

COLUMNS = ("name_ko", "name", "samples", "f1_local", "f1_federated", "gain_pct")


@dataclass(frozen=True)
class District:
    """One district: Korean and romanised name, study sample count, F1 local/federated and gain in %."""

    name_ko: str
    name: str
    samples: int
    f1_local: float
    f1_federated: float
    gain_pct: float


def read_districts_csv(path: str | Path) -> list[District]:
    """Parse a districts CSV with the columns of COLUMNS (DataError naming the file and row on bad content)."""
    path = Path(path)
    districts = read_csv_rows(path, COLUMNS, lambda row: District(
        name_ko=row["name_ko"].strip(), name=row["name"].strip(), samples=int(row["samples"]),
        f1_local=float(row["f1_local"]), f1_federated=float(row["f1_federated"]),
        gain_pct=float(row["gain_pct"])))
    names = [d.name for d in districts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate district name(s) {', '.join(duplicates)}")
    return districts


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[District, ...]:
    return tuple(read_districts_csv(data_file("districts.csv")))


def load_districts() -> list[District]:
    """The 25 districts in the study's table order."""
    return list(_shipped())


def district_names() -> list[str]:
    return [d.name for d in _shipped()]


def find_district(name: str) -> District:
    """Look a district up by romanised name (case-insensitive, "-gu" optional) or Korean name."""
    wanted = name.strip().lower()
    for district in _shipped():
        if wanted in (district.name.lower(), district.name.lower().removesuffix("-gu"), district.name_ko):
            return district
    raise DataError(f"unknown district '{name}' (known: {', '.join(district_names())})")


def district_order_key(name: str) -> tuple[int, str]:
    """Sort key: the study's table order first, unknown names after them alphabetically."""
    names = district_names()
    return (names.index(name), "") if name in names else (len(names), name)
