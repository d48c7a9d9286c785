"""The CPU worker pool behind the conv blocks: order, errors, thread count, BLAS thread control."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from nfed.core.functions import parallel


def test_results_keep_item_order_and_use_several_threads(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    seen = set()

    def task(item):
        seen.add(threading.get_ident())
        time.sleep(0.002)  # releases the GIL, like NumPy's heavy calls
        return item * item

    assert parallel.run_blocks(task, range(60)) == [i * i for i in range(60)]
    assert threading.get_ident() in seen and len(seen) >= 2  # the caller works too


def test_single_worker_runs_inline(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "1")
    assert parallel.num_workers() == 1
    threads = set()
    parallel.run_blocks(lambda i: threads.add(threading.get_ident()), range(5))
    assert threads == {threading.get_ident()}


def test_errors_propagate(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "2")

    def task(item):
        if item == 7:
            raise ValueError("block 7 failed")
        return item

    with pytest.raises(ValueError, match="block 7"):
        parallel.run_blocks(task, range(20))


def test_bad_thread_setting_falls_back_to_cpu_count(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "zero")
    assert parallel.num_workers() >= 1


def test_single_threaded_blas_restores_the_thread_count():
    blas = parallel._openblas()
    if blas.get is None:
        pytest.skip("NumPy is not linked against OpenBLAS here")
    before = blas.get()
    with parallel.single_threaded_blas():
        assert blas.get() == 1
    assert blas.get() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "2")
    parallel.run_blocks(lambda i: time.sleep(0.001), range(4))  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_squares_in_pool, (6,)) == [i * i for i in range(6)]


def _squares_in_pool(n):
    return parallel.run_blocks(lambda i: (time.sleep(0.001), i * i)[1], range(n))
