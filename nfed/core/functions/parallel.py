"""CPU parallelism for the heavy ops: a small worker pool over independent blocks of work.

OpenBLAS parallelises each matrix product internally, which pays off for a few huge products but turns
pathological for many cache-sized ones on a busy machine (every call waits for its slowest, possibly
descheduled, thread). The convolution code instead splits work into many independent blocks (sample x
row block) and runs them on this pool with single-threaded BLAS: a delayed worker only delays its own
block and the others take the rest. NumPy releases the GIL inside copies and matrix products, so Python
threads give real parallelism here (a small crew of helper threads with a cheap hand-off, _Crew).

Workers: $NFED_NUM_THREADS, else the CPUs this process may run on. The BLAS thread count is found through
OpenBLAS's C API (the library NumPy loaded); with another BLAS the pool still works, only less well.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading

ENV_THREADS = "NFED_NUM_THREADS"

_crew: _Crew | None = None
_crew_lock = threading.Lock()


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


class _Crew:
    """Helper threads that join the calling thread on one run of blocks at a time.

    A training step hands about 170 runs of blocks to the helpers (w8/64/8), so the hand-off itself counts:
    each helper sleeps on its own lock and is woken by releasing it, and reports by releasing another (a
    ThreadPoolExecutor's futures and condition variables cost 5-20 us more per run, 2-3 % of a step). One run
    at a time: a caller that finds the crew busy (another thread's run, or a block that itself runs blocks)
    does its blocks alone.
    """

    def __init__(self, helpers: int):
        self.size = helpers
        self.busy = threading.Lock()
        self.retired = False
        self.job = None
        self.wake = [_held_lock() for _ in range(helpers)]
        self.done = [_held_lock() for _ in range(helpers)]
        for index in range(helpers):
            threading.Thread(target=self._serve, args=(index,), name=f"nfed-cpu-{index}", daemon=True).start()

    def _serve(self, index: int) -> None:
        while True:
            self.wake[index].acquire()
            job = self.job
            if job is None:  # stop()
                return
            job()
            self.done[index].release()

    def run(self, work, helpers: int) -> None:
        """work() on the calling thread and on `helpers` helper threads at once; returns when all are done.
        work must not raise. The caller holds `busy`."""
        self.job = work
        for index in range(helpers):
            self.wake[index].release()
        work()
        for index in range(helpers):
            self.done[index].acquire()
        self.job = None

    def retire(self) -> None:
        """Let the helpers end as soon as no run uses them: now, or when the run that holds `busy` ends (never
        wait for it here: that run may be the caller's own, one level up)."""
        self.retired = True
        self.stop_if_retired()

    def stop_if_retired(self) -> None:
        if self.retired and self.busy.acquire(blocking=False):  # kept: a stopped crew stays busy for good
            self.job = None
            for lock in self.wake:
                lock.release()


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _crew_of(workers: int) -> _Crew:
    global _crew
    with _crew_lock:
        old = _crew
        if old is not None and old.size == workers - 1:
            return old
        _crew = _Crew(workers - 1)
        crew = _crew
    if old is not None:
        old.retire()
    return crew


def _discard(crew: _Crew) -> None:
    """Forget a crew whose helpers may still be at work (an interrupted run): the next run starts a new one."""
    global _crew
    with _crew_lock:
        if _crew is crew:
            _crew = None


def _forget_crew_in_child() -> None:
    """A forked child has none of the parent's helper threads: start a fresh crew there when needed."""
    global _crew, _crew_lock
    _crew = None
    _crew_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_crew_in_child)


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
    """[task(item) for item in items], spread over the calling thread and the helper threads, with
    single-threaded BLAS. Each thread pulls the next item itself, so a delayed one simply takes fewer items."""
    items = list(items)
    workers = num_workers() if workers is None else workers
    if workers <= 1:
        with single_threaded_blas():
            return [task(item) for item in items]
    if len(items) <= 1:
        return [task(item) for item in items]
    crew = _crew_of(workers)
    if not crew.busy.acquire(blocking=False):
        with single_threaded_blas():
            return [task(item) for item in items]
    results = [None] * len(items)
    errors = []
    next_index = itertools.count()  # next() on a count is atomic under the GIL

    def work():
        for index in next_index:
            if index >= len(items) or errors:
                return
            try:
                results[index] = task(items[index])
            except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread below
                errors.append(exc)
                return

    try:
        with single_threaded_blas():
            crew.run(work, min(workers, len(items)) - 1)
    except BaseException:  # interrupted while waiting for the helpers: they may still be working, so the
        _discard(crew)     # next run gets a fresh crew instead of reading this one's late reports
        raise
    finally:
        crew.busy.release()
        crew.stop_if_retired()
    if errors:
        raise errors[0]
    return results
