"""Reading small CSV tables (districts.csv, local.csv, federated.csv) with one-line errors on bad content."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from nfed.common.errors import DataError

T = TypeVar("T")


def read_csv_rows(path: str | Path, columns: Sequence[str], convert: Callable[[dict], T]) -> list[T]:
    """Rows of a CSV that must have `columns`, each passed through `convert`.

    A missing column, a value `convert` cannot parse (TypeError/ValueError) or an unreadable file raises
    DataError naming the file (and the line).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append(convert(row))
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}: line {line}: {exc}") from None
            return rows
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
