"""One nfed process per run folder: an exclusive lock on RUN/.nfed.lock for as long as a run writes there.

The lock is an flock(2) on the file, so the kernel releases it when its process dies however it dies; a
second run into the same folder fails at once with one line naming the holder (PID, host, command, start).
The file also holds the holder's description while it runs and is emptied on a clean release: a non-empty
file found unlocked was left by a run that crashed or was killed, which the next run reports
(`RunLock.stale`) before taking the folder over. A lock file that is a link, a hard link or a special file is
refused, never followed: opening it would truncate (and print) another file.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import socket
import sys
from pathlib import Path
from typing import Iterator

from nfed.common.atomic import make_folder, new_folder, output_error
from nfed.common.errors import ConfigError, NfedError
from nfed.common.paths import open_own_file

LOCK_NAME = ".nfed.lock"
# What _describe_self writes; anything else found in the file is not repeated to the user.
_DESCRIPTION = re.compile(r"pid \d+ on [^,]{1,255}, '[^\n]{0,300}', started [0-9T:+.-]{10,40}")


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


class RunLock:
    """`with RunLock(folder): ...` holds the folder exclusively. Not re-entrant: whoever holds a folder hands the
    held run on (nfed.runs.runfolder.recorded_run), so a second hold, even in this process, is refused."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.stale: str | None = None   # description of a previous holder that ended without releasing
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        make_folder(self.folder)
        path = self.folder / LOCK_NAME
        try:
            fd = open_own_file(path, os.O_RDWR | os.O_CREAT)   # a link or a hard link here is refused
        except OSError as exc:
            raise output_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunFolderBusy(f"{self.folder}: in use by another nfed run ({holder or 'holder unknown'}); "
                                "wait for it to end or choose another folder") from None
        previous = _read(fd)
        if previous:
            self.stale = previous
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _describe_self().encode("utf-8"), 0)
        except OSError as exc:
            os.close(fd)
            raise output_error(path, exc) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)   # a clean release leaves an empty lock file
            os.close(self._fd)              # closing releases the flock
            self._fd = None
        return False


@contextlib.contextmanager
def held_folder(folder: str | os.PathLike) -> Iterator[RunLock]:
    """Make the output folder (removed again if the block fails and leaves it empty) and hold it for the block."""
    with new_folder(folder), RunLock(folder) as lock:
        yield lock


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Description of the live process holding the folder's lock (this one included), None when none does.

    Tests the lock with a shared, non-blocking flock released at once, so it never waits and never takes the
    folder from anyone."""
    try:
        fd = open_own_file(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except (OSError, NfedError):   # absent, or not a lock nfed could have taken
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd) or "holder unknown"
    finally:
        os.close(fd)   # closing releases a lock this test took
    return None


def _read(fd: int) -> str:
    """The holder's description as _describe_self wrote it; other content is never repeated (it may not be ours)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
    if not text or (_DESCRIPTION.fullmatch(text) and text.isprintable()):
        return text
    return "the lock file holds something nfed did not write"


def _describe_self() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]) if sys.argv and sys.argv[0] else "python"
    return f"pid {os.getpid()} on {socket.gethostname()}, '{command}', started {started}"
