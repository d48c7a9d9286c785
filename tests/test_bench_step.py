"""`nfed bench step`'s engine (nfed.benchmarks.step) and its fresh-process protocol (nfed.benchmarks.isolated):
the reference is null with the reason when torch is missing, the report prints what the JSON holds, and a side's
crash or error is one NfedError line. No timing asserts."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from nfed.benchmarks.isolated import json_worker
from nfed.benchmarks.step import report_lines
from nfed.cli import cli
from nfed.common.errors import NfedError

TINY = ["--device", "cpu", "--width", "1", "--tile", "32", "--batch", "1", "--repeat", "1", "--warmup", "0"]


def test_without_torch_the_reference_is_null_with_the_reason(tmp_path):
    shadow = tmp_path / "torch"        # a torch that fails to import, first on the fresh processes' path
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = CliRunner(env={"PYTHONPATH": path}).invoke(cli, ["bench", "step", *TINY, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["nfed_img_per_s"] > 0
    assert 0 < report["nfed_cores_busy"] <= os.cpu_count() + 0.5  # CPU time over wall time of the timed steps
    assert report["reference_note"] == "PyTorch is not installed: pip install torch"
    assert report["ratio"] is report["reference_img_per_s"] is report["reference_peak_rss_mb"] is None
    assert "pytorch   not measured: PyTorch is not installed" in "\n".join(report_lines(report))


def _result(**extra) -> dict:
    return {"mode": "eval", "width": 2, "tile": 32, "batch": 4, "device": "cpu", "repeat": 3,
            "nfed_s_per_step": 0.5, "nfed_img_per_s": 8.0, "nfed_peak_rss_mb": 100.0, "nfed_blas": "OpenBLAS",
            "ratio": None, "reference_note": "skipped (--no-reference)", **extra}


def test_report_lines_say_what_the_json_holds():
    text = "\n".join(report_lines(_result()))
    assert text.startswith("W-Net-CD inference forward, w 2, tile 32, batch 4, cpu, 3 steps\n")
    assert "0.500 s/step       8.0 img/s  peak RSS 100 MB  (OpenBLAS)" in text
    assert text.endswith("pytorch   not measured: skipped (--no-reference)") and "by op" not in text
    measured = _result(mode="train", ratio=2.0, reference_s_per_step=1.0, reference_img_per_s=4.0,
                       reference_peak_rss_mb=300.0, reference_version="torch 2",
                       nfed_op_profile=[["Conv forward", 250.0, 0.5], ["other", 250.0, 0.5]])
    lines = report_lines(measured)
    assert lines[0].startswith("W-Net-CD training step")
    assert "1.000 s/step       4.0 img/s  peak RSS 300 MB  (torch 2)" in lines[2]
    assert "cores busy" not in lines[1]  # results written before the figure existed
    busy = report_lines(_result(nfed_cores_busy=1.5))
    assert busy[1].endswith("(OpenBLAS), 1.50 cores busy")
    assert lines[3] == "ratio (nfed / pytorch img/s): 2.00"
    assert lines[-2:] == [f"  {'Conv forward':32s}   250.00 ms  50.0%", f"  {'other':32s}   250.00 ms  50.0%"]


def test_a_side_answers_json_or_fails_in_one_line():
    assert json_worker("import json; print('noise'); print(json.dumps({'a': 1}))", [], "probe") == {"a": 1}
    code = ("import sys; from nfed.benchmarks.isolated import answer; from nfed.common.errors import NfedError\n"
            "def fail():\n    raise NfedError(sys.argv[1])\nanswer(fail)")
    with pytest.raises(NfedError, match="^told to fail$"):
        json_worker(code, ["told to fail"], "probe")
    with pytest.raises(NfedError, match="^probe failed: ZeroDivisionError: division by zero$"):
        json_worker("1 / 0", [], "probe")
    with pytest.raises(NfedError, match="^probe failed: no output$"):
        json_worker("pass", [], "probe")
