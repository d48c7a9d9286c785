"""`nfed bench kernels|aggregate` on CPU (small sizes), the W-Net layer-shape derivation, precision modes,
and bench/gpu_check.sh's refusal to run without its packages. GPU runs of the same code: gpu_check.sh."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

from nfed.benchmarks.gpu import bench_devices
from nfed.benchmarks.gpu_kernels import wnet_layer_shapes
from nfed.commands.bench_gpu import aggregate, kernels
from nfed.common.errors import ConfigError
from nfed.gpu import precision


def test_layer_shapes_cover_all_46_weighted_layers_of_the_study_size():
    shapes = wnet_layer_shapes(64, 256, 8)
    assert sum(s["layers"] for s in shapes) == 46
    first = shapes[0]
    # the siamese encoder runs past and current as one batch of 2 x 8
    assert (first["kind"], first["n"], first["c_in"], first["c_out"], first["h"]) == ("conv", 16, 3, 64, 256)
    keys = {(s["kind"], s["n"], s["c_in"], s["c_out"], s["h"], s["kernel"]) for s in shapes}
    assert ("conv", 16, 1024, 1024, 16, 3) in keys          # E5 of the U-Encoder
    assert ("deconv", 8, 2048, 512, 16, 2) in keys          # up4 from the fused f5
    assert ("conv", 8, 64, 2, 256, 1) in keys               # change head
    assert ("conv", 8, 64, 6, 256, 1) in keys               # reconstruction head
    assert len(keys) == len(shapes)
    conv = next(s for s in shapes if (s["c_in"], s["c_out"], s["h"]) == (64, 64, 256) and s["n"] == 16)
    assert conv["forward_flop"] == 2 * 16 * 64 * 256 * 256 * 64 * 9


def test_layer_shapes_reject_tiles_the_model_cannot_pool():
    with pytest.raises(ConfigError):
        wnet_layer_shapes(4, 40, 1)


def test_kernels_bench_on_cpu_writes_json(tmp_path):
    out = tmp_path / "k.json"
    result = CliRunner().invoke(kernels, ["--device", "cpu", "--width", "2", "--tile", "16", "--batch", "1",
                                          "--repeat", "1", "--warmup", "0", "--no-reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (dev,) = data["devices"]
    assert dev["device"] == "cpu" and dev["precision"] == "fp32"
    assert sum(r["layers"] for r in dev["layers"]) == 46
    assert all(r["nfed_forward_s"] > 0 and r["nfed_backward_tflops"] > 0 for r in dev["layers"])
    assert dev["geomean_ratio"] is None and "no-reference" in dev["reference_note"]
    assert "geometric mean" not in result.output and "conv 3->2" in result.output


def test_kernels_bench_refuses_reduced_precision_on_cpu():
    result = CliRunner().invoke(kernels, ["--device", "cpu", "--precision", "bf16", "--tile", "16",
                                          "--width", "1", "--batch", "1", "--no-reference"])
    assert result.exit_code != 0 and "needs a GPU" in str(result.exception)


def test_aggregate_bench_on_cpu_reports_bandwidth():
    result = CliRunner().invoke(aggregate, ["--device", "cpu", "--models", "3", "--parameters", "1e5",
                                            "--repeat", "1", "--warmup", "0", "--no-reference", "--json"])
    assert result.exit_code == 0, result.output
    (dev,) = json.loads(result.output)["devices"]
    assert dev["bytes_moved"] == 4 * 100_000 * 4
    assert dev["copy_gb_s"] > 0 and dev["nfed_kernel_gb_s"] > 0 and dev["aggregator_gb_s"] > 0


def test_precision_modes_parse_and_nest(monkeypatch):
    monkeypatch.delenv(precision.ENV_PRECISION, raising=False)
    assert precision.parse_precision(None) == "fp32"
    monkeypatch.setenv(precision.ENV_PRECISION, "TF32")
    assert precision.parse_precision("") == "tf32"
    with pytest.raises(ConfigError, match="bad precision 'fp16'"):
        precision.parse_precision("fp16")
    before = precision.get_precision()
    with precision.precision("bf16"):
        assert precision.get_precision() == "bf16"
    assert precision.get_precision() == before
    assert precision.TOLERANCES["fp32"] < precision.TOLERANCES["tf32"] < precision.TOLERANCES["bf16"]


def test_bench_devices_cpu():
    assert [str(d) for d in bench_devices("cpu")] == ["cpu"]


def test_gpu_check_script_stops_cleanly_without_its_packages(tmp_path):
    """With an interpreter lacking CuPy (this test's, on a CPU machine) nothing runs and the reason is named."""
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is importable here: the script would start the GPU checks")
    except Exception:
        pass
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "missing Python packages" in run.stderr and "cupy" in run.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["passed"] is False
