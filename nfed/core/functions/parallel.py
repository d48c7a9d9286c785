"""CPU parallelism for the heavy ops: a small worker pool over independent blocks of work.

OpenBLAS parallelises each matrix product internally, which pays off for a few huge products but turns
pathological for many cache-sized ones on a busy machine (every call waits for its slowest, possibly
descheduled, thread). The convolution code instead splits work into many independent blocks (sample x
row block) and runs them on this pool with single-threaded BLAS: a delayed worker only delays its own
block and the others take the rest. NumPy releases the GIL inside copies and matrix products, so Python
threads give real parallelism here.

Workers: $NFED_NUM_THREADS, else the CPUs this process may run on. The BLAS thread count is found through
OpenBLAS's C API (the library NumPy loaded); with another BLAS the pool still works, only less well.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

ENV_THREADS = "NFED_NUM_THREADS"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def num_workers() -> int:
    """Threads working on CPU ops, the calling thread included ($NFED_NUM_THREADS, else the usable CPU count)."""
    text = os.environ.get(ENV_THREADS, "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return usable_cpus()


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nfed-cpu")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's pool threads: start a fresh pool there when needed."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class _OpenBLAS:
    """get/set of OpenBLAS's thread count and its kernel family (core name) through ctypes (None when NumPy is
    not on OpenBLAS)."""

    SUFFIXES = ("scipy_openblas{}64_", "scipy_openblas{}", "openblas{}64_", "openblas{}")

    def __init__(self):
        self.get = self.set = self.corename = None
        for path in self._loaded_libraries():
            try:
                lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            for pattern in self.SUFFIXES:
                getter = getattr(lib, pattern.format("_get_num_threads"), None)
                setter = getattr(lib, pattern.format("_set_num_threads"), None)
                if getter is not None and setter is not None:
                    getter.restype = ctypes.c_int
                    setter.argtypes = [ctypes.c_int]
                    self.get, self.set = getter, setter
                    self.corename = getattr(lib, pattern.format("_get_corename"), None)
                    if self.corename is not None:
                        self.corename.restype = ctypes.c_char_p
                    return

    @staticmethod
    def _loaded_libraries() -> list[str]:
        import numpy  # noqa: F401 - make sure NumPy's BLAS is loaded before looking
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
        except OSError:  # pragma: no cover - not Linux
            return []
        return sorted(paths)


_blas = None


def _openblas() -> _OpenBLAS:
    global _blas
    if _blas is None:
        _blas = _OpenBLAS()
    return _blas


def blas_kernels() -> str:
    """"OpenBLAS <core>" (the kernel family it runs, e.g. Haswell or SkylakeX), or "unknown"."""
    blas = _openblas()
    if blas.corename is None:
        return "unknown"
    return f"OpenBLAS {blas.corename().decode()}"


@contextlib.contextmanager
def single_threaded_blas():
    """Inside: BLAS calls run on the calling thread only (no-op when the BLAS is not OpenBLAS)."""
    blas = _openblas()
    if blas.set is None:
        yield
        return
    previous = blas.get()
    if previous != 1:
        blas.set(1)
    try:
        yield
    finally:
        if previous != 1:
            blas.set(previous)


def run_blocks(task, items, workers: int | None = None) -> list:
    """[task(item) for item in items], spread over the calling thread and the pool, with single-threaded
    BLAS. Each worker pulls the next item itself, so a delayed worker simply takes fewer items."""
    items = list(items)
    workers = num_workers() if workers is None else workers
    if workers <= 1:
        with single_threaded_blas():
            return [task(item) for item in items]
    if len(items) <= 1:
        return [task(item) for item in items]
    results = [None] * len(items)
    next_index = itertools.count()  # next() on a count is atomic under the GIL

    def work():
        for index in next_index:
            if index >= len(items):
                return
            results[index] = task(items[index])

    with single_threaded_blas():
        helpers = [_executor(workers - 1).submit(work) for _ in range(min(workers, len(items)) - 1)]
        try:
            work()
        finally:
            for helper in helpers:
                helper.result()
    return results
