"""Bounded worker pools: no idle processes, no more than the memory holds."""
from __future__ import annotations

import concurrent.futures
import logging
from types import SimpleNamespace

import pytest

from nfed.common import memory


class Stop(Exception):
    """Ends a run once it has shown what it would start."""


class Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class RecordingPool(Context):
    """Stands for district_jobs.WorkerPool: records how many processes it was asked for."""
    started: list[int] = []

    def __init__(self, count: int):
        RecordingPool.started.append(count)

    def map(self, tasks):
        raise Stop


@pytest.fixture
def recording_pool(monkeypatch):
    from nfed.federation import district_jobs

    RecordingPool.started = []
    monkeypatch.setattr(district_jobs, "WorkerPool", RecordingPool)
    return RecordingPool.started


def _stop(*args, **kwargs):
    raise Stop


def test_demo_jobs_16_for_one_district_starts_no_idle_worker(tmp_path, monkeypatch, recording_pool, caplog):
    from nfed import demo
    from nfed.federation import district_jobs

    monkeypatch.setattr(demo, "make_data", lambda out_dir, settings, echo: {"Gangnam-gu": tmp_path / "g.h5"})
    monkeypatch.setattr(district_jobs, "run_task", _stop)   # in-process work stops here too
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        demo.run_demo(tmp_path / "out", demo.DemoSettings(jobs=16, districts="Gangnam-gu", quiet=True),
                      echo=lambda line: None)
    assert recording_pool == []   # one district: it trains in this process, no pool of 16 idle workers
    assert "--jobs 16: 1 worker process (only 1 district)" in caplog.text


def test_bench_round_jobs_capped_at_the_districts(tmp_path, monkeypatch, recording_pool):
    from nfed.benchmarks.round import time_rounds
    from nfed.federation import server
    from nfed.training.trainer import TrainConfig

    monkeypatch.setattr(server, "Federation", _stop)
    packs = {name: tmp_path / f"{name}.h5" for name in ("Gangnam-gu", "Jung-gu")}
    with pytest.raises(Stop):
        time_rounds(packs, tmp_path / "run", TrainConfig(width=2), rounds=1, warmup=0, jobs=16)
    assert recording_pool == [2]


class InlineExecutor(Context):
    """Stands for ProcessPoolExecutor: runs each job at once in this process, records max_workers."""
    sizes: list[int] = []

    def __init__(self, max_workers: int):
        InlineExecutor.sizes.append(max_workers)

    def submit(self, function, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(function(*args, **kwargs))
        return future


@pytest.mark.parametrize("jobs, fits, expected", [(16, None, 2), (16, 1, 1), (2, 50, 2)])
def test_synth_pool_capped_at_districts_and_memory(tmp_path, monkeypatch, jobs, fits, expected):
    from nfed.data.synth import synthesise

    InlineExecutor.sizes = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlineExecutor)
    if fits is not None:
        monkeypatch.setattr(memory, "memory_limit_bytes", lambda: fits * memory.WORKER_BYTES)
    synthesise(tmp_path / "s", scale=0.0001, tile=16, districts="Gangnam-gu,Jung-gu", min_per_district=1,
               jobs=jobs)
    assert InlineExecutor.sizes == ([expected] if expected > 1 else [])


def test_worker_count_caps_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 3 * memory.WORKER_BYTES)
    with caplog.at_level(logging.WARNING):
        assert memory.worker_count(16, 25) == 3
        assert memory.worker_count(16, 25, say=False) == 3
        assert memory.worker_count(2, 25) == 2
        assert memory.worker_count(8, 0) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "--jobs 16: 3 worker processes (the memory holds 3 at 0.2 GiB each)",
        "--jobs 8: 1 worker process (only 0 districts)"]
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: None)
    assert memory.worker_count(1024, 5, option="--workers") == 5


def test_federate_workers_share_the_cpus_among_the_clients_that_run(tmp_path, monkeypatch):
    from nfed.federation import worker

    seen = []

    def launch(self, index, task, round_dir, global_path, env):
        seen.append(env["OMP_NUM_THREADS"])
        raise Stop

    for name in worker.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(worker.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(worker.WorkerRunner, "_launch", launch)
    runner = worker.WorkerRunner(16, tmp_path / "work")
    with pytest.raises(Stop):
        runner.run({}, [SimpleNamespace(setup={"round": 1}, district="Gangnam-gu")], None)
    assert seen == ["16"]   # one client: it gets every CPU, not 1/16 of them
