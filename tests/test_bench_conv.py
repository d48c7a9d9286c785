"""The conv benchmark machinery (tiny shapes: this checks the plumbing, not the speed)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from nfed.benchmarks import conv as benchmarks_conv
from nfed.cli import cli


def test_run_conv_bench_reports_times_ratios_and_table():
    result = benchmarks_conv.run_conv_bench(shapes=[(1, 2, 3, 8)], repeat=1, memory=False)
    rows = result["rows"]
    assert [r["pass"] for r in rows] == ["forward", "backward"]
    for row in rows:
        assert row["nfed_ms"] > 0 and row["nfed_images_per_s"] > 0
        if result["torch_version"] is not None:
            assert row["throughput_ratio"] > 0
    if result["torch_version"] is not None:
        assert result["geomean_forward"] > 0 and result["geomean_backward"] > 0
    table = benchmarks_conv.format_table(result)
    assert "(1, 2, 3, 8)" in table and "forward" in table
    json.dumps(result)  # JSON-able


def test_peak_memory_of_one_call_is_measured():
    peak = benchmarks_conv.measure_peak("nfed", (2, 4, 4, 32), "forward")
    assert isinstance(peak, int) and peak >= 0


def test_cli_rejects_bad_options_in_one_line():
    for args in (["--repeat", "0"], ["--threads", "0"]):
        outcome = CliRunner().invoke(cli, ["bench", "conv", *args])
        assert outcome.exit_code == 1 and ">= 1" in outcome.output
        assert "Traceback" not in outcome.output
