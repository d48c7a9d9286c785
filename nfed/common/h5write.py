"""HDF5 output that fails cleanly on a full disk, a read-only file system or a lost permission.

HDF5 does not survive a failed write: after ENOSPC its close fails half-way, and the next close (or the garbage
collection of the file's objects) crashes the process with a segmentation fault (h5py 3.16 / HDF5 2.0 on a
full tmpfs). Here HDF5 writes through a Python file object (h5py's `fileobj` driver) that keeps the first
write error to itself, so the library always closes normally; the writer checks `failed()` as it goes, and the
failure is raised afterwards as one OutputError naming the target. The file is written to a temporary name
beside the target and renamed only when complete (nfed.common.atomic).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

import h5py

from nfed.common.atomic import atomic_path, output_error


class GuardedFile:
    """Unbuffered binary file for HDF5 whose write errors are recorded (`error`) instead of raised.

    After the first failure writes are dropped (reads of the lost regions return zeros): HDF5 then finishes
    and closes a file that is thrown away anyway.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "r+b", buffering=0)
        self.error: OSError | None = None

    def _guard(self, operation, *args):
        if self.error is None:
            try:
                return operation(*args)
            except OSError as exc:  # any: raised into HDF5, it would leave the library in the crashing state
                self.error = exc
        return None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            written = 0
            while written < len(view) and self.error is None:
                count = self._guard(self._file.write, view[written:])
                if not count and self.error is None:
                    self.error = OSError(errno.EIO, "a write made no progress")
                written += count or 0
        return len(view)

    def read(self, size: int = -1) -> bytes:
        """Bytes at the current position; beyond the end of the file (or of what was lost) zeros, as HDF5's
        own POSIX driver reads them."""
        data = self._file.read(size)
        if size is not None and 0 <= len(data) < size:
            data += bytes(size - len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: int | None = None) -> int:
        self._guard(self._file.truncate, size)
        return self._file.tell() if size is None else size

    def flush(self) -> None:
        self._guard(os.fsync, self._file.fileno())

    def close(self) -> None:
        self._file.close()


class GuardedH5File(h5py.File):
    """An h5py.File over a GuardedFile; `failed()` says whether any byte could not be written."""

    def __init__(self, guard: GuardedFile):
        super().__init__(guard, "w")
        self.guard = guard

    def failed(self) -> OSError | None:
        return self.guard.error


@contextlib.contextmanager
def create_h5(target: str | os.PathLike) -> Iterator[GuardedH5File]:
    """Yield a new HDF5 file that appears under `target` only when the block ends and every write succeeded.

    On failure the temporary file is removed and OutputError names `target` and the reason (e.g. "No space left
    on device"); an exception of the block itself propagates unchanged.
    """
    target = Path(target)
    with atomic_path(target, suffix=".h5") as tmp:
        guard = GuardedFile(tmp)
        try:
            h5 = GuardedH5File(guard)
            try:
                yield h5
            except BaseException:
                h5.close()
                if guard.error is not None:  # the block stumbled over the lost bytes: report the cause
                    raise output_error(target, guard.error) from None
                raise
            h5.close()  # writes cannot fail inside HDF5: the guard records them
            guard.flush()
            if guard.error is not None:
                raise output_error(target, guard.error)
        finally:
            guard.close()


def raise_if_failed(h5: GuardedH5File, target: str | os.PathLike) -> None:
    """Stop a long write early once a byte could not be written (OutputError naming `target`)."""
    if h5.failed() is not None:
        raise output_error(target, h5.failed())
