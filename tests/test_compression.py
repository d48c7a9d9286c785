"""Bytes on the wire (issue 26): compressed client updates (fp16, int8, int8 with error feedback), a float16
broadcast, their validation, the bytes a round records, exact resume with error feedback, and Flower."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_norm_policy import _tiny_config, tiny_packs  # noqa: F401 - the module's fixture, shared

from nfed.common.errors import ConfigError, DataError
from nfed.federation.compression import (BLOCK, ErrorFeedback, _blocks, apply_delta, broadcast, broadcast_bytes,
                                         decode, encode, payload_bytes, received)
from nfed.federation.config import FederationConfig

RNG = np.random.default_rng(0)
DELTA = {"enc.conv.weight": (RNG.standard_normal((64, 32, 3, 3)) * 1e-3).astype(np.float32),
         "enc.conv.bias": (RNG.standard_normal(64) * 1e-3).astype(np.float32),
         "enc.bn1.running_mean": RNG.standard_normal(300).astype(np.float32),
         "head.weight": (RNG.standard_normal(10000) * np.linspace(0, 5, 10000)).astype(np.float32)}


def _scales(payload, name):
    return np.repeat(payload["arrays"][f"s.{name}"], payload["manifest"]["block"])


@pytest.mark.parametrize("block", [BLOCK, 64])
def test_int8_round_trip_errs_by_at_most_half_a_blocks_scale(block):
    payload = encode(DELTA, "int8", block)
    back = decode(payload, DELTA)
    for name in ("enc.conv.weight", "head.weight"):
        error = np.abs(back[name] - DELTA[name]).ravel()
        bound = _scales(payload, name)[:error.size] * 0.5 * (1 + 1e-5)
        assert np.all(error <= bound), name
        assert back[name].dtype == np.float32 and back[name].shape == DELTA[name].shape
    # BatchNorm statistics and tensors of fewer than 256 values travel as float32: exact
    np.testing.assert_array_equal(back["enc.bn1.running_mean"], DELTA["enc.bn1.running_mean"])
    np.testing.assert_array_equal(back["enc.conv.bias"], DELTA["enc.conv.bias"])


def test_fp16_round_trip_is_float16_rounding():
    back = decode(encode(DELTA, "fp16"), DELTA)
    weight = DELTA["enc.conv.weight"]
    np.testing.assert_array_equal(back["enc.conv.weight"], weight.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back["enc.bn1.running_mean"], DELTA["enc.bn1.running_mean"])


def test_int8_sends_a_quarter_of_the_bytes_and_fp16_half():
    big = {"w": RNG.standard_normal(1 << 20).astype(np.float32)}
    full = big["w"].nbytes
    assert payload_bytes(encode(big, "int8")) <= 0.26 * full      # >= 74 % fewer upload bytes
    assert payload_bytes(encode(big, "fp16")) <= 0.501 * full


def test_the_manifest_does_not_grow_with_the_model():
    """Names, shapes and encodings follow from the receiver's model, so a payload is its arrays and a header of a
    few dozen bytes, however many tensors the model has (version 1 listed them all: 3 % of an int8 update at the
    demo's width)."""
    many = {f"layer{i}.weight": RNG.standard_normal(300).astype(np.float32) for i in range(500)}
    for mode in ("int8", "fp16"):
        payload = encode(many, mode)
        arrays = sum(a.nbytes for a in payload["arrays"].values())
        assert payload_bytes(payload) - arrays < 100, mode
        back = decode(payload, many)
        assert list(back) == list(many)


def test_error_feedback_sends_the_sum_of_the_deltas_over_rounds():
    """Over rounds, what int8-ef sent sums to the uncompressed deltas' sum minus the last residual (which stays
    bounded by half a scale): nothing is lost, only late."""
    feedback = ErrorFeedback()
    rng = np.random.default_rng(1)
    total, sent = np.zeros(5000, np.float64), np.zeros(5000, np.float64)
    for _ in range(20):
        delta = {"w": (rng.standard_normal(5000) * 1e-3 + 2e-5).astype(np.float32)}
        payload = feedback.encode(delta, block=512)
        total += delta["w"]
        sent += decode(payload, delta)["w"]
    np.testing.assert_allclose(sent + feedback.residual["w"], total, rtol=0, atol=1e-6)
    assert np.abs(feedback.residual["w"]).max() <= 0.5 * np.abs(total).max()
    # without feedback a drift under half a step (one large value per block sets the scale) is rounded away
    peaks = np.arange(5000) % 512 == 0
    drift = {"w": np.where(peaks, 1.0, 2e-5).astype(np.float32)}
    plain = decode(encode(drift, "int8", 512), drift)["w"]
    assert np.all(plain[~peaks] == 0)


def _malformed(change):
    payload = encode(DELTA, "int8", 64)
    payload = {"manifest": json.loads(json.dumps(payload["manifest"])), "arrays": dict(payload["arrays"])}
    change(payload["manifest"], payload["arrays"])
    return payload


def _quantised_statistic(arrays):
    """enc.bn1.running_mean sent as int8 (as if it were a weight) instead of float32."""
    value = arrays.pop("v.enc.bn1.running_mean")
    arrays["q.enc.bn1.running_mean"] = np.zeros(value.size, np.int8)
    arrays["s.enc.bn1.running_mean"] = np.ones(_blocks(value.size, 64), np.float32)


MALFORMED = {
    "missing tensor": lambda m, a: (a.pop("q.enc.conv.weight"), a.pop("s.enc.conv.weight")),
    "missing scales": lambda m, a: a.pop("s.head.weight"),
    "unknown tensor": lambda m, a: a.update({"q.enc.evil.weight": a["q.enc.conv.weight"],
                                             "s.enc.evil.weight": a["s.enc.conv.weight"]}),
    "extra array": lambda m, a: a.update({"x.extra": np.zeros(3, np.float32)}),
    "short array": lambda m, a: a.update({"q.enc.conv.weight": a["q.enc.conv.weight"][:-1]}),
    "2-D array": lambda m, a: a.update({"q.enc.conv.weight": a["q.enc.conv.weight"].reshape(64, -1)}),
    "wrong dtype": lambda m, a: a.update({"q.enc.conv.weight": a["q.enc.conv.weight"].astype(np.int16)}),
    "float16 in an int8 update": lambda m, a: a.update({"v.head.weight": np.zeros(10000, np.float16)}),
    "NaN scale": lambda m, a: a["s.enc.conv.weight"].__setitem__(0, np.nan),
    "negative scale": lambda m, a: a["s.enc.conv.weight"].__setitem__(0, -1.0),
    "infinite float32": lambda m, a: a.update({"v.enc.conv.bias": np.full(64, np.inf, np.float32)}),
    "statistic quantised": lambda m, a: _quantised_statistic(a),
    "unknown mode": lambda m, a: m.update(mode="int4"),
    "bad block": lambda m, a: m.update(block=-1),
    "block unlike the scales": lambda m, a: m.update(block=128),
    "foreign format": lambda m, a: m.update(format="pickle"),
    "version 1 (names in the manifest)": lambda m, a: m.update(version=1),
    "unknown manifest field": lambda m, a: m.update(entries=[{"name": "enc.conv.weight"}]),
    "not an array": lambda m, a: a.update({"s.enc.conv.weight": [1.0] * 288}),
}


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_a_malformed_compressed_update_is_refused_in_one_line(how):
    payload = _malformed(MALFORMED[how])
    with pytest.raises(DataError, match="^malformed compressed update") as caught:
        decode(payload, DELTA)
    assert "\n" not in str(caught.value)


def test_a_payload_larger_than_the_model_is_refused():
    payload = encode(DELTA, "int8")
    with pytest.raises(DataError, match="exceed"):
        decode(payload, DELTA, max_bytes=100)
    with pytest.raises(DataError, match="malformed"):
        decode({"manifest": [], "arrays": {}}, DELTA)


def test_a_float16_broadcast_halves_the_big_tensors_and_keeps_statistics():
    weights = {name: value + 1.0 for name, value in DELTA.items()}
    sent = broadcast(weights, "fp16")
    assert sent["enc.conv.weight"].dtype == np.float16 and sent["enc.bn1.running_mean"].dtype == np.float32
    assert broadcast_bytes(weights, "fp16") < 0.55 * broadcast_bytes(weights, "fp32")
    back = received(sent)
    assert all(value.dtype == np.float32 for value in back.values())
    np.testing.assert_array_equal(back["enc.bn1.running_mean"], weights["enc.bn1.running_mean"])
    rebuilt = apply_delta(weights, decode(encode({k: back[k] - back[k] for k in back}, "int8"), weights))
    np.testing.assert_array_equal(rebuilt["head.weight"], weights["head.weight"])   # added to the exact global


def test_options_and_what_they_cannot_combine_with():
    assert FederationConfig().compress == "none" and FederationConfig().broadcast == "fp32"
    with pytest.raises(ConfigError, match="--compress must be one of none, fp16, int8, int8-ef"):
        FederationConfig(compress="int4")
    with pytest.raises(ConfigError, match="--broadcast must be one of fp32, fp16"):
        FederationConfig(broadcast="int8")
    with pytest.raises(ConfigError, match="secure aggregation"):
        FederationConfig(secure_aggregation=True, compress="int8")
    with pytest.raises(ConfigError, match="secure aggregation"):
        FederationConfig(secure_aggregation=True, broadcast="fp16")
    FederationConfig(dp_clip=1.0, compress="int8-ef", broadcast="fp16")   # DP-FedAvg combines


# ------------------------------------------------------------------------------- real clients, tiny

def _federate(packs, run_dir, resume=False, **options):
    from nfed.federation.server import federate

    config = FederationConfig(**{"rounds": 2, "eps": 0.0, **options})
    return federate(packs, run_dir, _tiny_config(), config, resume=resume)


def test_a_compressed_federation_records_its_bytes_per_client_and_round(tiny_packs, tmp_path):
    from nfed.federation.norm_policy import shared_bytes

    plain = _federate(tiny_packs, tmp_path / "plain", rounds=1)
    squeezed = _federate(tiny_packs, tmp_path / "int8", rounds=1, compress="int8", broadcast="fp16")
    model = shared_bytes(plain.global_weights, "shared")
    for result, up_at_most, down_at_most in ((plain, model, model), (squeezed, 0.4 * model, 0.6 * model)):
        record = result.rounds[0]
        for district in tiny_packs:
            entry = record["clients"][district]
            assert 0 < entry["bytes_up"] <= up_at_most and 0 < entry["bytes_down"] <= down_at_most
        assert record["bytes_up"] == sum(record["clients"][d]["bytes_up"] for d in tiny_packs)
        summary = json.loads((result.run_dir / "summary.json").read_text())
        traffic = summary["traffic"]
        assert traffic["bytes_up"] == record["bytes_up"] and traffic["bytes_down"] == record["bytes_down"]
        assert traffic["model_bytes"] == model
    assert plain.rounds[0]["clients"]["Nowon-gu"]["bytes_up"] == model
    summary = json.loads((squeezed.run_dir / "summary.json").read_text())["traffic"]
    assert summary["compress"] == "int8" and summary["broadcast"] == "fp16"
    assert summary["paper_round_seconds_20mbit"] < json.loads(
        (plain.run_dir / "summary.json").read_text())["traffic"]["paper_round_seconds_20mbit"] * 0.5
    # the compressed round still learns: the global model moved
    assert squeezed.rounds[0]["norm_difference"] > 0


def test_error_feedback_resumes_exactly(tiny_packs, tmp_path):
    from nfed.runs.runfolder import client_residual

    full = _federate(tiny_packs, tmp_path / "full", compress="int8-ef", dp_clip=50.0)
    residual = client_residual(tmp_path / "full", "Nowon-gu", 3)
    assert residual and any(np.abs(v).max() > 0 for v in residual.values())
    _federate(tiny_packs, tmp_path / "split", rounds=1, compress="int8-ef", dp_clip=50.0)
    resumed = _federate(tiny_packs, tmp_path / "split", resume=True, compress="int8-ef", dp_clip=50.0)
    for name, value in full.global_weights.items():
        np.testing.assert_array_equal(value, resumed.global_weights[name], err_msg=name)
    with pytest.raises(ConfigError, match="compress"):
        _federate(tiny_packs, tmp_path / "split", resume=True, rounds=3, compress="int8")


def test_worker_processes_send_compressed_updates(tiny_packs, tmp_path):
    inline = _federate(tiny_packs, tmp_path / "inline", rounds=1, compress="int8-ef")
    workers = _federate(tiny_packs, tmp_path / "workers", rounds=1, compress="int8-ef", workers=2)
    for name, value in inline.global_weights.items():
        np.testing.assert_allclose(workers.global_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert workers.rounds[0]["bytes_up"] == inline.rounds[0]["bytes_up"]


# ------------------------------------------------------------------------------- over Flower (loopback grid)

@pytest.mark.flower
def test_flower_with_compression_equals_the_in_process_federation(tmp_path):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import WIDTH, LoopbackGrid, flat_run_config, make_tiny_packs

    from nfed.federation.flower.app import serve
    from nfed.federation.server import federate
    from nfed.training.trainer import profile_config

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
        grid = LoopbackGrid({30 + i: {"pack": str(path)} for i, path in enumerate(packs.values())})
        train = profile_config("demo", width=WIDTH, batch_size=2, lr=0.001, seed=3)
        config = FederationConfig(rounds=2, eps=0.0, min_clients=3, seed=3, compress="int8-ef", broadcast="fp16")
        flower = serve(grid, flat_run_config(train, config, tmp_path / "flower"), echo=lambda line: None)
        local = federate(packs, tmp_path / "local", train, config)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    for name, value in local.global_weights.items():
        np.testing.assert_allclose(flower.global_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert all(r["answered"] == list(packs) for r in flower.rounds)
    plain = flower.rounds[0]["shared_bytes"]
    for record in flower.rounds:
        for entry in record["clients"].values():
            assert entry["bytes_up"] < 0.4 * plain and entry["bytes_down"] < 0.6 * plain
    assert any(grid.contexts[node].state.array_records.get("nfed.residual") for node in grid.contexts)


def test_the_report_says_what_a_paper_size_round_costs_at_20_mbit():
    from nfed.federation.compression import traffic_summary
    from nfed.report.text import traffic_line

    model = 1000
    records = [{"shared_bytes": model, "clients": {d: {"bytes_up": up, "bytes_down": 500} for d in "ab"}}
               for up in (250, 250)]
    traffic = traffic_summary(records, "int8", "fp16")
    assert traffic["upload_ratio"] == 0.25 and traffic["download_ratio"] == 0.5
    # 67.341 M values x 4 bytes x 8 bits x (0.25 + 0.5) / 20 Mbit/s
    assert traffic["paper_round_seconds_20mbit"] == pytest.approx(67_341_000 * 32 * 0.75 / 20e6, abs=0.1)
    line = traffic_line(traffic)
    assert "--compress int8" in line and "20 Mbit/s takes 81 s per district" in line
    assert "takes" not in traffic_line(traffic_summary([], "none", "fp32"))


def test_a_late_compressed_reply_is_counted_but_never_decoded(monkeypatch):
    """A reply past the deadline is never averaged: its bytes are recorded, its payload is not decoded (so even a
    malformed one costs no decoding and is not called rejected), and it holds no weights afterwards."""
    from nfed.federation.client import ClientOutcome, ClientResult
    from nfed.federation.server import Federation

    late = ClientOutcome("Jung-gu", "late", result=ClientResult({}, 5, update=_malformed(MALFORMED["short array"])))
    good = ClientOutcome("Mapo-gu", "ok", result=ClientResult({}, 5, update=encode(DELTA, "int8", 64)))
    bad = ClientOutcome("Guro-gu", "ok", result=ClientResult({}, 5, update=_malformed(MALFORMED["short array"])))
    import nfed.federation.compression as compression

    decoded = []
    monkeypatch.setattr(compression, "decode", lambda payload, *args: decoded.append(payload) or decode(payload, *args))
    Federation._decoded(None, [late, good, bad], DELTA)
    assert len(decoded) == 2 and late.result.update is None
    assert late.status == "late" and late.result.weights == {} and late.result.bytes_up > 0
    assert good.status == "ok" and sorted(good.result.weights) == sorted(DELTA)
    assert bad.status == "rejected" and bad.reason.startswith("malformed compressed update")
