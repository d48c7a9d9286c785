"""Atomic file output: write to a temporary file beside the target, then rename over it.

An interrupted write therefore never leaves a file that looks complete (the rename is atomic on POSIX). A
failed write (disk full, read-only file system, no permission) removes its temporary file and raises one
OutputError naming the target. Temporary names carry the writer's host and PID, so the next writer into the
same folder removes those whose process is gone (a killed run) and never touches a live one's. Files and
folders are created with the process's umask, like any other program's output.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from nfed.common import strict_json
from nfed.common.errors import OutputError
from nfed.common.paths import open_own_file

# errno values that mean "this output cannot be written here" rather than "the input is wrong".
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EISDIR,
                errno.ENOTDIR, errno.EIO}
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?\.tmp$")


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def output_error(target, exc: OSError) -> OutputError:
    """One line naming the output and why it could not be written."""
    reason = exc.strerror or str(exc).splitlines()[0]
    return OutputError(f"{target}: cannot write ({reason})")


def temporary_name(target: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside `target` that says which host and process writes it."""
    return target.parent / f".{target.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}.tmp"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files and folders left in `folder` by writers on this host that no longer run."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or match.group("host") != _HOST or _process_alive(int(match.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def make_folder(path: str | os.PathLike) -> Path:
    """mkdir -p with the umask's permissions; OutputError naming the folder when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: cannot make this folder (a file of that name exists)") from None
    except OSError as exc:
        raise output_error(path, exc) from None
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to `target`, else delete it."""
    target = Path(target)
    make_folder(target.parent)
    remove_stale_temporaries(target.parent)
    tmp = temporary_name(target, suffix)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise output_error(target, exc) from None
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_write_failure(exc) and exc.filename in (None, str(tmp), str(target)):
            raise output_error(target, exc) from None
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (an old one is removed)."""
    target = Path(target)
    make_folder(target.parent)
    remove_stale_temporaries(target.parent)
    work = temporary_name(target)
    try:
        work.mkdir(0o777)
    except OSError as exc:
        raise output_error(target, exc) from None
    try:
        yield work
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if is_write_failure(exc) and (exc.filename is None or str(exc.filename).startswith(str(work))):
            raise output_error(target, exc) from None
        raise


@contextlib.contextmanager
def new_folder(path: str | os.PathLike, litter: tuple[str, ...] = (".nfed.lock",)) -> Iterator[Path]:
    """Make `path` (and missing parents) for a command's output; if the command fails, remove the folders
    this call made, provided they hold nothing but `litter` (a failed command leaves no empty folders)."""
    path = Path(path)
    made = [folder for folder in reversed([path, *path.parents]) if not folder.exists()]
    make_folder(path)
    try:
        yield path
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                if all(entry.name in litter for entry in folder.iterdir()):
                    for name in litter:
                        (folder / name).unlink(missing_ok=True)
                    folder.rmdir()
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike, obj, indent: int = 2) -> None:
    """Strict JSON (non-finite numbers as null), written atomically."""
    write_text_atomic(target, strict_json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


class LineLog:
    """An append-only text log (e.g. epochs.jsonl) whose write failures raise OutputError naming it; written in
    place, so a link planted at its name is refused rather than followed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        make_folder(self.path.parent)
        try:
            self._file = open(open_own_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")
        except OSError as exc:
            raise output_error(self.path, exc) from None

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            raise output_error(self.path, exc) from None

    def flush(self) -> None:
        self.write("")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
