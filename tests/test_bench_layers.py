"""bench/bench_layers.py: the units it reads off the model and its report (tiny sizes: plumbing, not speed)."""
from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench

from nfed.model import wnet

def _bench():
    return load_bench("bench_layers")


def test_units_are_every_conv_bn_relu_of_the_model_in_forward_order():
    units = _bench().unit_shapes(width=2, tile=16, batch=3)
    assert len(units) == 36  # 2 paths x 9 blocks x 2 units
    assert [u["name"] for u in units[:3]] == ["encoder.e1.conv1", "encoder.e1.conv2", "encoder.e2.conv1"]
    assert units[0]["x_shape"] == (6, 3, 16, 16)  # siamese encoder: both dates in one batch
    assert units[0]["w_shape"] == (2, 3, 3, 3)
    assert units[-1]["name"] == "decoder.d1.conv2" and units[-1]["x_shape"] == (3, 2, 16, 16)
    assert wnet.F.conv_bn_relu.__name__ == "conv_bn_relu"  # the recording wrapper is gone again


def test_measure_and_report_against_pytorch():
    pytest.importorskip("torch")
    bench = _bench()
    result = bench.measure(width=1, tile=16, batch=2, repeat=1)
    assert len(result["units"]) == 36 and result["sgemm_gflops"] > 0
    unit = result["units"][0]
    assert len(unit["nfed_ms"]) == len(unit["torch_nchw_ms"]) == len(unit["torch_channels_last_ms"]) == 3
    lines = bench.report(result)
    assert any(line.startswith("encoder.e1.conv1") for line in lines)
    assert any(line.startswith("total vs PyTorch NCHW") for line in lines)
    json.dumps(result)
