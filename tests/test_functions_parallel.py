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


def test_a_block_that_runs_blocks_itself_does_them_alone(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "2")

    def outer(item):
        time.sleep(0.001)
        return sum(parallel.run_blocks(lambda i: item * 10 + i, range(3)))

    assert parallel.run_blocks(outer, range(6)) == [sum(item * 10 + i for i in range(3)) for item in range(6)]


def test_threads_calling_at_once_each_get_their_results(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "2")
    results = {}

    def caller(offset):
        results[offset] = parallel.run_blocks(lambda i: (time.sleep(0.0005), offset + i)[1], range(40))

    threads = [threading.Thread(target=caller, args=(k * 100,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {k * 100: [k * 100 + i for i in range(40)] for k in range(4)}


def test_a_new_thread_count_gets_a_new_crew(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    parallel.run_blocks(lambda i: i, range(4))
    assert parallel._crew.size == 2
    monkeypatch.setenv("NFED_NUM_THREADS", "2")
    seen = set()
    assert parallel.run_blocks(lambda i: (seen.add(threading.get_ident()), time.sleep(0.002), i)[2],
                               range(20)) == list(range(20))
    assert parallel._crew.size == 1 and len(seen) == 2


def test_a_nested_run_with_another_thread_count_does_not_wait_for_itself():
    results = []

    def outer(item):
        return sum(parallel.run_blocks(lambda i: (time.sleep(0.001), i)[1], range(4), workers=3))

    caller = threading.Thread(target=lambda: results.append(parallel.run_blocks(outer, range(4), workers=2)))
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "run_blocks waited for its own run to end"
    assert results == [[6, 6, 6, 6]]
    assert parallel.run_blocks(lambda i: i, range(4), workers=2) == [0, 1, 2, 3]


def test_an_interrupted_wait_retires_the_crew(monkeypatch):
    monkeypatch.setenv("NFED_NUM_THREADS", "2")
    parallel.run_blocks(lambda i: i, range(4))
    crew = parallel._crew

    def interrupted(work, helpers):
        raise KeyboardInterrupt

    monkeypatch.setattr(crew, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parallel.run_blocks(lambda i: i, range(4))
    assert parallel._crew is None  # the next run starts a fresh crew, whatever the old helpers still do
    assert parallel.run_blocks(lambda i: i * 2, range(4)) == [0, 2, 4, 6]
