"""The ServerApp aggregates as replies arrive (issue 26): the streamed round gives the held round's global weights,
a malformed reply in the stream is refused while the round goes on, the replies are not held, and rounds whose
aggregation needs every reply (robust aggregators, --max-sample-share < 1) still hold them.

The SuperNodes are a Grid double that answers with prepared updates, one reply per poll in a chosen order; the
server code under test (Federation._collect, FlowerClients, nfed.federation.streaming) is the real one."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")

from bench_scripts import load_bench  # noqa: E402
from test_flower import task_identity  # noqa: E402,F401 - Flower's per-process task identity, as a ServerApp's

SAMPLES = {"Gangnam-gu": 40, "Gangdong-gu": 25, "Gangbuk-gu": 70, "Gangseo-gu": 9}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"enc.conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
            "enc.bn.weight": rng.standard_normal(16).astype(np.float32),
            "enc.bn.running_var": rng.random(16).astype(np.float32) + 0.5,
            "head.bias": rng.standard_normal(1).astype(np.float32)}


GLOBAL = _model(0)
UPDATES = {district: _model(index + 1) for index, district in enumerate(SAMPLES)}


def _grid(arrival=None, spoil=None):
    """node i serves district i and answers with its prepared update (or `spoil`'s), one reply per poll in
    `arrival` order (bench/bench_server_memory.py's grid)."""
    from nfed.federation.flower.messages import weights_to_record

    bench = load_bench("bench_server_memory")
    spoil = dict(spoil or {})
    return bench.LazyReplyGrid(list(SAMPLES), SAMPLES, lambda d: weights_to_record(spoil.get(d, UPDATES[d])), arrival)


def _round(tmp_path: Path, *, streams: bool = True, arrival=None, spoil=None, **options):
    """One round's collection through Federation._collect: (outcomes, new weights, echoed lines, clients)."""
    import nfed.federation.flower.exchange as flower_exchange
    from nfed.federation.client import ClientTask, make_round_setup
    from nfed.federation.config import FederationConfig
    from nfed.federation.flower.transport import FlowerClients
    from nfed.federation.roster import Roster
    from nfed.federation.server import Federation
    from nfed.training.trainer import profile_config

    flower_exchange.time = SimpleNamespace(monotonic=time.monotonic, sleep=lambda seconds: None)
    lines: list[str] = []
    clients = FlowerClients(_grid(arrival, spoil), Roster(list(SAMPLES), echo=lines.append), timeout=None,
                            eval_timeout=None, echo=lines.append)
    clients.connect(len(SAMPLES), 1.0)
    if not streams:
        clients.streams = False
    federation = Federation(clients.pack_labels(), tmp_path / "run", profile_config("demo", width=4),
                            FederationConfig(rounds=1, **options), initial_weights=GLOBAL, runner=clients,
                            echo=lines.append, tile=32, train_samples=SAMPLES,
                            data_fingerprint={district: None for district in SAMPLES})
    setup = make_round_setup(profile_config("demo", width=4), 1, 1)
    tasks = [ClientTask(district, federation.packs[district], setup) for district in SAMPLES]
    outcomes, _, aggregator = federation._collect(clients, GLOBAL, tasks, 1)
    return outcomes, aggregator.finish(), lines, clients


@pytest.fixture(autouse=True)
def _real_clock():
    import nfed.federation.flower.exchange as flower_exchange

    yield
    flower_exchange.time = time


def test_streamed_round_equals_the_held_round(tmp_path, task_identity):
    """In task order the streamed average is bit-identical to the held one; in another arrival order it differs by
    at most one float32 unit in the last place (float64 sums in another order); no reply's weights are kept."""
    _, held, _, _ = _round(tmp_path / "held", streams=False)
    outcomes, streamed, _, _ = _round(tmp_path / "streamed")
    _, shuffled, _, _ = _round(tmp_path / "shuffled", arrival=list(reversed(SAMPLES)))
    expected = {name: sum(np.float64(SAMPLES[d]) * UPDATES[d][name].astype(np.float64) for d in SAMPLES)
                / sum(SAMPLES.values()) for name in GLOBAL}
    for name in GLOBAL:
        np.testing.assert_array_equal(streamed[name], held[name], err_msg=name)
        np.testing.assert_array_max_ulp(shuffled[name], held[name], maxulp=1)
        np.testing.assert_allclose(held[name], expected[name], rtol=1e-6)
    assert [o.status for o in outcomes] == ["ok"] * len(SAMPLES)
    assert all(o.result.weights == {} and o.result.update is None for o in outcomes)   # nothing held after the fold


def test_malformed_reply_in_the_stream_is_refused_and_the_round_goes_on(tmp_path, task_identity):
    bad = dict(UPDATES["Gangdong-gu"])
    bad["enc.bn.weight"] = np.full(16, np.nan, np.float32)
    wrong = {name: value for name, value in UPDATES["Gangbuk-gu"].items() if name != "head.bias"}
    outcomes, streamed, _, _ = _round(tmp_path / "streamed", spoil={"Gangdong-gu": bad, "Gangbuk-gu": wrong})
    status = {o.district: (o.status, o.reason) for o in outcomes}
    assert status["Gangdong-gu"][0] == "rejected" and "NaN" in status["Gangdong-gu"][1]
    assert status["Gangbuk-gu"][0] == "rejected" and "missing" in status["Gangbuk-gu"][1]
    good = ("Gangnam-gu", "Gangseo-gu")
    assert all(status[d][0] == "ok" for d in good), status
    total = sum(SAMPLES[d] for d in good)
    for name in GLOBAL:
        expected = sum(np.float64(SAMPLES[d]) * UPDATES[d][name].astype(np.float64) for d in good) / total
        np.testing.assert_allclose(streamed[name], expected, rtol=1e-6)


@pytest.mark.parametrize("options, why", [({"aggregator": "median"}, "median aggregator needs every update"),
                                          ({"max_sample_share": 0.4}, "--max-sample-share 0.4 caps each claim")])
def test_rounds_that_need_every_reply_hold_them(tmp_path, task_identity, options, why, monkeypatch):
    """A robust aggregator or a share cap keeps the held path (said once); the held run's FlowerClients.run is the
    one called, never run_streaming."""
    from nfed.federation.flower.transport import FlowerClients

    def refuse(*args, **kwargs):
        raise AssertionError("streamed a round that needs every reply")

    monkeypatch.setattr(FlowerClients, "run_streaming", refuse)
    outcomes, average, lines, _ = _round(tmp_path, **options)
    held = [line for line in lines if "the server holds each round's replies until its last" in line]
    assert len(held) == 1 and why in held[0]
    assert average is not None and all(o.status == "ok" for o in outcomes)
