"""`nfed status RUN --follow` on a fake run folder whose files a thread updates as a federation would, and the
elapsed time and time left that long commands print (nfed.common.progress, the round line)."""
from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner

from nfed.cli import cli
from nfed.common.progress import Countdown, rounds_left
from nfed.federation.round_record import round_line
from nfed.federation.stop_rules import StopRules
from nfed.runs.runfolder import ROUNDS_NAME, write_rounds
from nfed.runs.runlock import RunLock
from nfed.runs.runstatus import write_status

BUDGET = 10


def record(number, late=(), f1=0.5, seconds=2.0):
    answered = ["Gangnam-gu", "Mapo-gu", "Jung-gu"][:3 - len(late)]
    return {"round": number, "selected": [*answered, *late], "answered": answered, "late": list(late),
            "failed": {}, "rejected": {}, "problem": None, "kept_previous": False, "norm_difference": 0.1,
            "clients": {d: {"status": "ok", "seconds": 1.0} for d in answered}, "mean_val_f1": f1,
            "seconds": seconds}


def follow(run_dir, *extra):
    return CliRunner().invoke(cli, ["status", str(run_dir), "--follow", "--interval", "0.05", *extra])


def federation(run_dir, ending, started: threading.Event, lock_released=None):
    """Three rounds, a second apart in file time, then `ending`: finished, failed, or the lock let go (killed)."""
    with RunLock(run_dir):
        records = []
        write_status(run_dir, "running", round_number=0, rounds=BUDGET)
        started.set()
        for number in (1, 2, 3):
            time.sleep(0.15)
            late = ("Jung-gu",) if number == 2 else ()
            records.append(record(number, late=late, f1=0.1 * number))
            write_rounds(run_dir / ROUNDS_NAME, records)
            write_status(run_dir, "running", round_number=number, rounds=BUDGET,
                         problems={d: "late" for d in late})
        time.sleep(0.15)
        if ending == "finished":
            write_status(run_dir, "finished", round_number=3, rounds=BUDGET, best_round=3,
                         stop_reason="validation loss has not improved by more than 0 for 3 round(s)")
        elif ending == "failed":
            write_status(run_dir, "failed", round_number=3, rounds=BUDGET, reason="no space left on device")


def watched(tmp_path, ending):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = threading.Event()
    thread = threading.Thread(target=federation, args=(run_dir, ending, started), daemon=True)
    thread.start()
    assert started.wait(10)
    result = follow(run_dir)
    thread.join(10)
    return result


def test_follow_shows_every_round_and_exits_0_when_the_run_finishes(tmp_path):
    result = watched(tmp_path, "finished")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for number in (1, 2, 3):
        assert any(f"running: round {number}/{BUDGET}" in line for line in lines), result.output
    second = next(line for line in lines if "round 2/10" in line)
    assert "2/3 answered" in second and "late: Jung-gu" in second and "mean val F1 0.2000" in second
    assert "2.0 s a round" in second and "left at most 16 s (8 rounds of the budget)" in second
    assert "left out 1: Jung-gu (late)" in second
    assert "finished: round 3/10" in lines[-1] and "validation loss has not improved" in lines[-1]


def test_follow_exits_1_with_the_reason_when_the_run_fails(tmp_path):
    result = watched(tmp_path, "failed")
    assert result.exit_code == 1 and "failed: round 3/10" in result.output.splitlines()[-1]
    assert "no space left on device" in result.output


def test_follow_exits_1_when_the_runs_process_dies_without_finishing(tmp_path):
    result = watched(tmp_path, "killed")
    assert result.exit_code == 1, result.output
    assert "ended without finishing after round 3 (killed?)" in result.output.splitlines()[-1]


def test_follow_of_a_finished_run_prints_once_and_returns(tmp_path):
    write_status(tmp_path, "finished", round_number=2, rounds=2, best_round=2, stop_reason="round budget of 2 spent")
    write_rounds(tmp_path / ROUNDS_NAME, [record(1), record(2)])
    result = follow(tmp_path)
    assert result.exit_code == 0 and result.output.count("\n") == 1
    assert "finished: round 2/2, 3/3 answered, mean val F1 0.5000; round budget of 2 spent" in result.output
    assert "left" not in result.output


def test_follow_prints_strings_from_the_files_escaped(tmp_path):
    hostile = "Evil\x1b[2J-gu"
    write_status(tmp_path, "failed", round_number=1, rounds=5, reason="node said \x1b]0;pwned\x07",
                 problems={hostile: "late"})
    write_rounds(tmp_path / ROUNDS_NAME, [record(1, late=(hostile,))])
    result = follow(tmp_path)
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output
    assert "Evil\\x1b[2J-gu" in result.output


def test_follow_survives_a_damaged_history(tmp_path):
    with RunLock(tmp_path):
        write_status(tmp_path, "running", round_number=1, rounds=5)
        (tmp_path / ROUNDS_NAME).write_text("{not json\n")
        stop = threading.Timer(0.2, write_status, args=(tmp_path, "finished", ),
                               kwargs={"round_number": 1, "rounds": 5})
        stop.start()
        result = follow(tmp_path)
        stop.join()
    assert result.exit_code == 0, result.output
    assert "running: round 1/5" in result.output and "finished: round 1/5" in result.output


def test_ctrl_c_stops_watching_cleanly_with_the_running_exit_status(tmp_path, monkeypatch):
    with RunLock(tmp_path):
        write_status(tmp_path, "running", round_number=1, rounds=5)
        write_rounds(tmp_path / ROUNDS_NAME, [record(1)])

        def interrupted(seconds):
            raise KeyboardInterrupt

        monkeypatch.setattr(time, "sleep", interrupted)
        result = follow(tmp_path)
    assert result.exit_code == 3, result.output
    assert "running: round 1/5" in result.output and "stopped watching" in result.output
    assert "Traceback" not in result.output and "interrupted" not in result.output


def test_without_follow_the_status_line_and_exit_codes_are_unchanged(tmp_path):
    with RunLock(tmp_path):
        write_status(tmp_path, "running", round_number=1, rounds=5)
        result = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert result.exit_code == 3 and "running: round 1/5" in result.output and "answered" not in result.output


def test_the_round_line_tells_the_time_left_with_the_stop_rules_state():
    records = [record(n, seconds=10.0) for n in (1, 2, 3, 4)]
    stop = StopRules(max_rounds=100, patience_rounds=3, warmup_rounds=2)
    stop.rounds_since_best = 1
    line = round_line(records[-1], 100, records, stop)
    assert "40 s elapsed, left at most 16.0 min (96 rounds of the budget)" in line
    assert "at least 20 s (loss rule: 1/3 rounds without improvement)" in line
    assert "left" not in round_line({**records[-1], "stop": "round budget of 4 spent"}, 4, records, stop)
    assert "left" not in round_line(records[-1], 100)   # callers without the history: the line as before


def test_rounds_left_during_the_warm_up_and_at_the_budget():
    assert rounds_left([5.0], 1, 10, patience=3, warmup=5) == \
        "5 s elapsed, left at most 45 s (9 rounds of the budget), at least 35 s (loss rule: 0/3 rounds without " \
        "improvement)"
    assert rounds_left([5.0] * 10, 10, 10, patience=3) == "50 s elapsed"
    assert "at least" not in rounds_left([5.0], 8, 10, patience=3)   # the budget comes first


def test_countdown_estimates_after_the_first_district():
    ticks = iter([0.0, 120.0, 240.0, 300.0])
    countdown = Countdown(3, clock=lambda: next(ticks))
    assert countdown.step() == "1/3 districts done, 2.0 min elapsed, about 4.0 min left"
    assert countdown.step() == "2/3 districts done, 4.0 min elapsed, about 2.0 min left"
    assert countdown.step() == "3/3 districts done, 5.0 min elapsed"


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (89.4, "89 s"), (150, "2.5 min"), (7200, "2.0 h")])
def test_duration(seconds, text):
    from nfed.common.progress import duration

    assert duration(seconds) == text
