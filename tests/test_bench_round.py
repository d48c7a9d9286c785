"""`nfed bench round`: the JSON's structure, and the parts of a round adding up to the round (no timing asserts)."""
import json
import math

import pytest
from click.testing import CliRunner

from nfed.benchmarks.round import PARTS, RoundClock, summarise
from nfed.cli import cli


class FakeTime:
    """A clock that moves only when told to."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_round_clock_splits_a_round_at_its_hooks():
    now = FakeTime()
    clock = RoundClock(now)

    class Runner:
        def run(self, weights, tasks, deadline):
            now.t += 5.0
            return ["done"] * len(tasks)

    def evaluate(weights, setup, pack, split, device):
        now.t += 0.5
        return {"loss": 1.0}

    runner, evaluate_fn = clock.timed_runner(Runner()), clock.timed_evaluate(evaluate)
    for round_number in (1, 2):
        now.t += 0.25                          # selection, tasks
        assert runner.run({}, ["a", "b", "c"], None) == ["done"] * 3
        now.t += 1.0                           # aggregation
        for _ in range(4):
            evaluate_fn({}, {}, "pack", split="val", device=None)
            now.t += 0.125                     # the loop between evaluations
        now.t += 2.0                           # checkpoints, records
        clock.running(round_number, best_round=1, stop_reason=None)
    for record in clock.rounds:
        assert record["train"] == 5.0 and record["aggregate"] == 1.0
        assert record["evaluate"] == 4 * 0.5 + 3 * 0.125   # first call's start to last call's end
        assert record["other"] == 0.25 + 0.125 + 2.0
        assert record["total"] == sum(record[part] for part in PARTS) == 10.75
        assert (record["clients"], record["evaluations"]) == (3, 4)
    assert [r["round"] for r in clock.rounds] == [1, 2]
    assert summarise(clock.rounds)["evaluate"] == {"median": 2.375, "min": 2.375}


@pytest.mark.parametrize("pool", [[], ["--jobs", "2", "--local-epochs", "2"]], ids=["in-turn", "pool"])
def test_bench_round_json_parts_add_up(tmp_path, pool):
    out = tmp_path / "round.json"
    result = CliRunner().invoke(cli, ["bench", "round", "--districts", "3", "--width", "2", "--tile", "32",
                                       "--rounds", "1", "--warmup", "1", "--json", "--out", str(out), *pool])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert json.loads(out.read_text()) == report
    assert (report["districts"], report["districts_run"], report["width"], report["tile"]) == (3, 3, 2, 32)
    assert report["batch"] == 8 and report["rounds"] == 1 and report["warmup"] == 1
    assert len(report["per_round"]) == 1 and len(report["warmup_per_round"]) == 1
    timed = report["per_round"][0]
    assert timed["round"] == 2                 # the warm-up round is not counted
    assert (timed["clients"], timed["evaluations"]) == (3, 3)
    assert all(timed[part] >= 0 for part in PARTS)
    assert math.isclose(sum(timed[part] for part in PARTS), timed["total"], rel_tol=1e-6, abs_tol=1e-3)
    # the federation's own clock runs from client selection to the end of the validation: inside the round,
    # and around training, aggregation and evaluation
    inner = timed["train"] + timed["aggregate"] + timed["evaluate"]
    assert inner - 0.002 <= timed["federation_seconds"] <= timed["total"] + 0.002
    for part in PARTS + ("total",):
        assert report["seconds"][part] == {"median": timed[part], "min": timed[part]}
    assert report["peak_rss_mb"] > 10
    assert len(report["load_average_before"]) == len(report["load_average_after"]) == 3


def test_bench_round_missing_data_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "round", "--data", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "packs folder not found" in result.output and "Traceback" not in result.output
