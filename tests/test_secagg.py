"""Secure aggregation over Flower (Flower's SecAgg+ driven by nfed's round loop): the result equals plain FedAvg
within the quantisation error, the server never holds an individual update, a node dropping out after sharing
its keys is survived. In-process (every message serialised as on the wire) and on a real SuperLink."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flower_harness import FlowerDeployment, flwr_available
from test_flower import write_app  # noqa: F401 (task_identity is a fixture)
from test_flower import (LoopbackGrid, flat_run_config, load_global, make_tiny_packs, start_nodes,  # noqa: F401
                         task_identity)   # task_identity: a fixture

pytestmark = [pytest.mark.flower,
              pytest.mark.skipif(not flwr_available(), reason="flwr is not installed (pip install 'nfed[flower]')")]

# FedAvg of one round within the quantisation error: each of <= 3 clients rounds every coordinate of its delta
# to 2 * 8 / 2^22 (Flower's default clipping range 8), stochastically, so at most one step each.
QUANTISATION_ATOL = 3 * 16 / 2**22


class WireGrid(LoopbackGrid):
    """The in-process grid, but every message crosses Flower's protobuf serialisation both ways (as between
    real processes: no object is shared) and is kept for inspection; nodes in `drop_at_training` never answer
    the SecAgg+ stage `drop_at` names, nor any later message (that node is gone)."""

    def __init__(self, *args, drop_at: dict[int, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_at = dict(drop_at or {})
        self.received = []   # (node, reply) for every reply the server pulled

    def push_messages(self, messages):
        from flwr.common.serde import message_from_proto, message_to_proto

        copies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            copy = message_from_proto(message_to_proto(message))
            copy.metadata.__dict__["_message_id"] = message.object_id
            configs = copy.content.config_records.get("secaggplus_configs", {})
            if configs.get("stage") is not None and configs.get("stage") == self.drop_at.get(copy.metadata.dst_node_id):
                self.silent.add(copy.metadata.dst_node_id)
            copies.append(copy)
        return super().push_messages(copies)

    def pull_messages(self, message_ids):
        from flwr.common.serde import message_from_proto, message_to_proto

        replies = [message_from_proto(message_to_proto(r)) for r in super().pull_messages(message_ids)]
        self.received += [(r.metadata.src_node_id, r) for r in replies]
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def configs(width=4):
    from nfed.training.trainer import profile_config

    return profile_config("demo", width=width, batch_size=2, lr=0.001, seed=0)


def serve_secure(tmp_path, packs, grid, **options):
    from nfed.federation.config import FederationConfig
    from nfed.federation.flower.app import serve

    fed = FederationConfig(**{"rounds": 1, "eps": 0.0, "secure_aggregation": True, "deadline": 30.0, **options})
    lines = []
    result = serve(grid, flat_run_config(configs(), fed, tmp_path / "secure"), echo=lines.append)
    return result, lines


def plain_fedavg(tmp_path, packs, name="plain"):
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    return federate(packs, tmp_path / name, configs(), FederationConfig(rounds=1, eps=0.0))


def assert_no_update_in_clear(grid, packs, start_weights):
    """Every reply the server pulled holds key material or a masked vector, never an array: and no masked
    vector is its node's quantised delta (it looks uniform modulo 2^32)."""
    from flwr.common import bytes_to_ndarray

    for node, reply in grid.received:
        assert not reply.has_error(), reply.error
        assert sum(len(a.data) for record in reply.content.array_records.values() for a in record.values()) == 0
        masked = reply.content.config_records.get("secaggplus_configs", {}).get("masked_params")
        if masked is not None:
            vector = bytes_to_ndarray(masked[1]).astype(np.float64)   # [0] is the weight factor
            assert vector.min() >= 0 and vector.max() < 2**32
            assert abs(vector.mean() / 2**32 - 0.5) < 0.01             # uniform, unlike the quantised delta
            assert abs(vector.std() / 2**32 - 12 ** -0.5) < 0.01     # (which sits near 2^21 in every coordinate)


def test_secure_round_equals_fedavg_and_the_server_sees_no_update(tmp_path, task_identity):
    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
    grid = WireGrid({30 + i: {"pack": str(path)} for i, path in enumerate(packs.values())})
    secure, lines = serve_secure(tmp_path, packs, grid)
    plain = plain_fedavg(tmp_path, packs)
    for name, value in plain.global_weights.items():
        np.testing.assert_allclose(secure.global_weights[name], value, rtol=0, atol=QUANTISATION_ATOL, err_msg=name)
    record = secure.rounds[0]
    assert record["answered"] == list(packs) and record["aggregator"] == "secure-fedavg"
    assert record["aggregation"]["individual_array_bytes"] == 0 and record["aggregation"]["masked_vectors"] == 3
    assert record["clients"]["Gangdong-gu"]["num_samples"] == 3
    assert_no_update_in_clear(grid, packs, None)
    assert any("3 node(s) train and send masked updates" in line for line in lines)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors"])
def test_secure_round_survives_a_node_dropping_out(tmp_path, task_identity, stage):
    """Gangdong-gu's node leaves before the key exchange, during it, or after it while training (then its
    masks with the others are rebuilt from their key shares)."""
    packs = make_tiny_packs(tmp_path / "packs", districts=("Gangnam-gu", "Gangdong-gu", "Gwangjin-gu", "Gangbuk-gu"),
                            counts=((2, 1, 1), (3, 1, 1), (2, 1, 1), (2, 1, 1)))
    nodes = {30 + i: {"pack": str(path)} for i, path in enumerate(packs.values())}
    grid = WireGrid(nodes, drop_at={31: stage})   # Gangdong-gu's node
    secure, _ = serve_secure(tmp_path, packs, grid, deadline=2.0)   # its evaluations wait out the deadline
    record = secure.rounds[0]
    assert record["answered"] == [d for d in record["selected"] if d != "Gangdong-gu"]
    assert record["late"] == ["Gangdong-gu"] and not record["kept_previous"]
    survivors = {d: p for d, p in packs.items() if d != "Gangdong-gu"}
    plain = plain_fedavg(tmp_path, survivors)
    for name, value in plain.global_weights.items():
        np.testing.assert_allclose(secure.global_weights[name], value, rtol=0, atol=QUANTISATION_ATOL, err_msg=name)


def test_a_node_weighing_itself_wrongly_voids_the_secure_aggregate(tmp_path, task_identity):
    from flwr.app import MetricRecord

    def inflate(message, reply):   # claims 10^6 training samples beside its masked vector
        if "fitres.num_examples" in reply.content.metric_records:
            reply.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 10**6})
        return reply

    packs = make_tiny_packs(tmp_path / "packs")
    grid = WireGrid({30 + i: {"pack": str(path)} for i, path in enumerate(packs.values())}, rogue={32: inflate})
    from nfed.common.errors import TrainingError
    from nfed.runs.runfolder import read_rounds
    from nfed.runs.runstatus import read_status

    # its only round kept the previous weights: a run in which no update was ever accepted fails
    with pytest.raises(TrainingError, match="no district's update was accepted"):
        serve_secure(tmp_path, packs, grid)
    record = read_rounds(tmp_path / "secure" / "rounds.jsonl")[0]
    assert record["kept_previous"] and "Gwangjin-gu weighed itself 1000000" in record["problem"]
    assert read_status(tmp_path / "secure")["state"] == "failed"


def test_secure_aggregation_excludes_what_needs_individual_updates(tmp_path):
    from nfed.common.errors import ConfigError
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    with pytest.raises(ConfigError, match="hides the individual updates that --aggregator median needs"):
        FederationConfig(secure_aggregation=True, aggregator="median")
    with pytest.raises(ConfigError, match="--max-sample-share cannot apply"):
        FederationConfig(secure_aggregation=True, max_sample_share=0.5)
    with pytest.raises(ConfigError, match="runs over Flower"):
        federate({"A-gu": Path("/nonexistent/A-gu.h5")}, tmp_path / "run", configs(),
                 FederationConfig(rounds=1, secure_aggregation=True), initial_weights={"w": np.zeros(2, np.float32)},
                 evaluate_fn=lambda *a, **k: {"loss": 0.0, "f1": 0.0})


def test_flower_app_writes_the_defences_into_the_run_config(tmp_path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from flwr.common.config import flatten_dict

    from nfed.federation.flower.config import OPTIONAL_KEYS, settings_from_run_config

    app = write_app(tmp_path / "app", tmp_path / "run", "--secure-aggregation", "--dp-clip", "0.5",
                    "--dp-noise", "1.2", "--secagg-range", "4")
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config["secure-aggregation"] is True and config["dp-noise"] == 1.2 and config["aggregator"] == "fedavg"
    settings = settings_from_run_config(flatten_dict(config))
    fed = settings.federation_config
    assert (fed.secure_aggregation, fed.dp_clip, fed.dp_noise, fed.dp_delta, fed.secagg_range) == (True, 0.5, 1.2,
                                                                                                   None, 4.0)
    old = {k: v for k, v in flatten_dict(config).items() if k not in OPTIONAL_KEYS}
    assert settings_from_run_config(old).federation_config.aggregator == "fedavg"   # apps written before


# ------------------------------------------------------------------------------------------ real deployment

@pytest.mark.slow
def test_secure_flower_run_equals_fedavg_and_survives_a_killed_node(tmp_path):
    """Real SuperLink + 4 SuperNodes: round 1 with all, then one node killed when round 2's training starts;
    round 1 equals in-process FedAvg within the quantisation error and the server received no update."""
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    districts = ("Gangnam-gu", "Gangdong-gu", "Gwangjin-gu", "Gangbuk-gu")
    packs = make_tiny_packs(tmp_path / "packs", districts=districts,
                            counts=((4, 2, 2), (6, 2, 2), (3, 2, 2), (3, 2, 2)))
    app = write_app(tmp_path / "app", tmp_path / "flower-run", "--rounds", "2", "--min-clients", "3",
                    "--expected-nodes", "4", "--deadline", "40", "--secure-aggregation", "--no-round-eval")
    victim = "Gangbuk-gu"
    with FlowerDeployment(tmp_path / "flower") as flower:
        start_nodes(flower, packs)

        def kill_when_round_2_trains(line: str) -> None:
            if "sending round 2" in line and victim in flower.supernodes:
                flower.kill_supernode(victim)

        result = flower.run_app(app, timeout=400, on_line=kill_when_round_2_trains)
        assert result.returncode == 0, result.output + flower.logs()
    rounds = [json.loads(line) for line in (tmp_path / "flower-run" / "rounds.jsonl").read_text().splitlines()]
    assert [len(r["answered"]) for r in rounds] == [4, 3], result.output
    assert all(r["aggregation"]["individual_array_bytes"] == 0 for r in rounds)
    assert victim not in rounds[1]["answered"] and not rounds[1]["kept_previous"]
    one = federate(packs, tmp_path / "plain", configs(), FederationConfig(rounds=1, eps=0.0, evaluate_rounds=False),
                   evaluate_test=False)
    first = json.loads((tmp_path / "flower-run" / "rounds.jsonl").read_text().splitlines()[0])
    assert first["norm_difference"] == pytest.approx(one.rounds[0]["norm_difference"], rel=1e-3)
    final = load_global(tmp_path / "flower-run")
    assert all(np.all(np.isfinite(v)) for v in final.values())
