"""nfed's CSV tables: reading them (districts.csv, local.csv, federated.csv) with one-line errors on bad content,
and writing them so that a spreadsheet shows every text cell as text.

Formula injection: a spreadsheet runs a cell that begins with =, +, - or @ as a formula (some also after a leading
TAB or CR), so a district or file name such as `=HYPERLINK(...)` would run when the table is opened. Such a text cell
is written with a leading apostrophe (OWASP's advice; the spreadsheet shows the text without it), and so is text
that already begins with one, so that the reader can drop exactly one and give back the original. Numbers nfed
formats itself (a negative gain "-2.50") are not text and stay numbers.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from nfed.common.errors import DataError

T = TypeVar("T")
TEXT_MARK = "'"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value, number: Callable[[object], str] = str) -> str:
    """One cell: text (str) with a leading apostrophe when a spreadsheet would run it or when it begins with one;
    anything else (numbers, None) as `number` formats it."""
    if isinstance(value, str):
        return TEXT_MARK + value if value.startswith(FORMULA_STARTS + (TEXT_MARK,)) else value
    return number(value)


def read_cell(cell: str) -> str:
    """The text csv_cell wrote (its leading apostrophe dropped)."""
    return cell[1:] if cell.startswith(TEXT_MARK) else cell


def csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of csv_cell cells as CSV text ("\\n" line ends). A row with a carriage return in a cell is quoted
    whole: the csv module quotes only the line end's own characters, and a bare CR ends the line for readers."""
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writerow(header)
    for row in rows:
        (quoted if any("\r" in cell for cell in row) else plain).writerow(row)
    return buffer.getvalue()


def read_csv_rows(path: str | Path, columns: Sequence[str], convert: Callable[[dict], T]) -> list[T]:
    """Rows of a CSV that must have `columns`, each (its text cells as csv_cell wrote them given back) passed
    through `convert`.

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
                    rows.append(convert({k: read_cell(v) if isinstance(v, str) else v for k, v in row.items()}))
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}: line {line}: {exc}") from None
            return rows
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
