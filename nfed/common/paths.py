"""Where nfed may write and what it may open: an output never replaces an input, and a run folder's own files
are never followed through links (one planted there would redirect a write, a truncation or a read elsewhere)."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

from nfed.common.errors import ConfigError, DataError


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _same_file(a, b) -> bool:
    """Whether two existing paths are one file (hard links included); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_output_over_inputs(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | Iterable | None],
                              out_option: str = "--out") -> None:
    """ConfigError when the output `out` is one of `inputs` (option -> path or paths read), or is a folder that
    holds one. Paths are compared after following links, and hard links count as the same file."""
    out_real = _real(out)
    for option, given in inputs.items():
        if given is None:
            continue
        for path in [given] if isinstance(given, (str, os.PathLike)) else given:
            in_real = _real(path)
            named = f"{option}" if str(path) == str(out) else f"{option} {path}"
            if in_real == out_real or _same_file(out, path):
                raise ConfigError(f"{out_option} {out} is the input {named} (refusing to overwrite an input)")
            if out_real in in_real.parents:
                raise ConfigError(f"{out_option} {out} holds the input {named} (refusing to write over an input: "
                                  "choose another folder)")


def open_own_file(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """os.open for a file nfed keeps in a run folder: never through a symbolic link, never a FIFO or device,
    and for writing never a file with other names (a hard link); DataError naming it otherwise. The descriptor
    is close-on-exec."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic link: refusing to follow it (remove it)") from None
        raise
    try:
        info = os.fstat(fd)
        writes = flags & (os.O_WRONLY | os.O_RDWR)
        if not stat.S_ISREG(info.st_mode) or (writes and info.st_nlink > 1):
            raise DataError(f"{path}: not a regular file of its own (a special file or a hard link): refusing to "
                            "use it (remove it)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own_text(path: str | os.PathLike) -> str:
    """The text of a state file nfed wrote (open_own_file's rules); FileNotFoundError when it is absent."""
    fd = open_own_file(path, os.O_RDONLY)
    with open(fd, encoding="utf-8", closefd=True) as handle:
        return handle.read()


def refuse_link(path: str | os.PathLike) -> None:
    """DataError when `path` is a symbolic link (for files read by a library that opens them by name)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise DataError(f"{path} is a symbolic link: refusing to follow it (remove it)")
