"""Progress bars on stderr for long work; silent when disabled or when stderr is not wanted."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

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
