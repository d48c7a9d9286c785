"""Bounded worker pools (no idle processes, no more than the memory holds) and output files that a spreadsheet or a
markdown viewer shows as text: a hostile district or file name cannot run a formula or inject a link or HTML."""
from __future__ import annotations

import concurrent.futures
import csv
import io
import logging
import re
from types import SimpleNamespace

import pytest
from report_runs import districts, make_run

from nfed.common import memory
from nfed.runs.results import read_results, write_results_csv

HOSTILE = ['=HYPERLINK("http://evil.example","click")', "+1+1", "-2+3", "@SUM(A1:A9)", "\tTab", "\rReturn",
           "'=quoted", "'plain", "Gangnam-gu"]


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
        runner.run({}, [SimpleNamespace(setup=SimpleNamespace(round=1), district="Gangnam-gu")], None)
    assert seen == ["16"]   # one client: it gets every CPU, not 1/16 of them


# -- CSV: text cells a spreadsheet shows as text -------------------------------------------------------------

def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_results_csv_guards_text_cells_keeps_numbers_and_reads_names_back(tmp_path):
    rows = [{"district": name, "samples": 10, "precision": -0.12, "recall": 0.5, "f1": 0.25, "iou": 0.1,
             "stop": "=cmd"} for name in HOSTILE]
    path = write_results_csv(tmp_path / "local.csv", rows, "local")
    with path.open(newline="", encoding="utf-8") as handle:
        cells = _cells(handle.read())[1:]
    assert [row[0] for row in cells] == [
        '\'=HYPERLINK("http://evil.example","click")', "'+1+1", "'-2+3", "'@SUM(A1:A9)", "'\tTab", "'\rReturn",
        "''=quoted", "''plain", "Gangnam-gu"]
    assert {row[2] for row in cells} == {"-0.120000"}   # a number nfed formats stays a number
    assert {row[-2] for row in cells} == {"'=cmd"}
    back = read_results(path)
    assert list(back) == HOSTILE
    assert back["+1+1"]["precision"] == pytest.approx(-0.12) and back["+1+1"]["stop"] == "=cmd"


def test_report_table_csv_guards_names_not_negative_gains(tmp_path):
    from nfed.report.build import make_study_report

    entries = districts()
    entries[0]["name"] = "=1+2"
    make_study_report([make_run(tmp_path / "run", entries)], tmp_path / "r", figures=False)
    cells = {row[0]: row for row in _cells((tmp_path / "r" / "table.csv").read_text(encoding="utf-8"))}
    assert "'=1+2" in cells and "=1+2" not in cells
    assert cells["Gangseo-gu"][6] == "-2.50"   # the gain column: negative, not turned into text


def test_change_summary_csv_guards_image_names(tmp_path):
    from nfed.data.vectors import write_summary_csv

    write_summary_csv(tmp_path / "changes.csv", [{"image": "=2+5.png", "type": "new", "count": 1, "pixels": 4,
                                                  "area": 4.0}])
    assert _cells((tmp_path / "changes.csv").read_text(encoding="utf-8"))[1] == ["'=2+5.png", "new", "1", "4", "4"]


# -- table.md: file text shown as text ---------------------------------------------------------------------------

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def test_table_md_shows_hostile_names_as_text(tmp_path):
    from nfed.report.build import make_study_report
    from nfed.report.text import markdown_text

    name = "x|y <img src=x onerror=alert(1)> [click](http://evil.example) *b* _i_ `c` \\\n| z | row |"
    entries = districts(**{"Gangdong-gu": {"local_stop": "early|stop\n<b>"}})
    entries[0]["name"] = name
    make_study_report([make_run(tmp_path / "<b>run", entries)], tmp_path / "r", figures=False)
    text = (tmp_path / "r" / "table.md").read_text(encoding="utf-8")
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 * (2 + 4)   # two tables: header, rule and four districts each
    for line in table_lines:
        assert len(UNESCAPED_PIPE.findall(line)) in (13, 8), line   # 12 columns, 7 columns: no extra cell
    for markup in ("<img", "<b>", "](", "`c"):   # a tag, a link, a code span: each only escaped
        assert not re.search(r"(?<!\\)" + re.escape(markup), text), markup
    assert markdown_text(name) in text and "Run \\<b\\>run:" in text
    assert markdown_text("a*b_c [d] <e> | `f` & #g\nh") == "a\\*b\\_c \\[d\\] \\<e\\> \\| \\`f\\` \\& \\#g h"
    assert markdown_text("Gangnam-gu") == "Gangnam-gu" and markdown_text("0.5 ± 0.1") == "0.5 ± 0.1"
