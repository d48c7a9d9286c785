"""Norm policies over Flower (issue 24, item 1): under fedbn / silobn only the shared tensors travel, both ways
(training, evaluation, the test scoring); each SuperNode keeps its district's BatchNorm in its Flower context state,
and the run equals the in-process one."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_flower import WIDTH, LoopbackGrid, flat_run_config, make_tiny_packs, task_identity  # noqa: F401

from nfed.federation.config import FederationConfig
from nfed.federation.norm_policy import is_local

pytest.importorskip("flwr")


class Recorder:
    """A LoopbackGrid `rogue` hook that changes nothing: it keeps the names of the weights each message and each
    reply carried."""

    def __init__(self):
        self.sent: list[tuple[str, set]] = []
        self.replied: list[tuple[str, set]] = []

    def __call__(self, message, reply):
        from nfed.federation.flower.messages import WEIGHTS_RECORD, record_to_weights

        kind = message.metadata.message_type
        if WEIGHTS_RECORD in message.content:
            self.sent.append((kind, set(record_to_weights(message.content[WEIGHTS_RECORD]))))
        if reply.has_content() and WEIGHTS_RECORD in reply.content:
            self.replied.append((kind, set(record_to_weights(reply.content[WEIGHTS_RECORD]))))
        return reply


@pytest.mark.parametrize("policy", ["fedbn", "silobn"])
def test_only_the_shared_tensors_travel_and_the_run_equals_the_in_process_one(tmp_path, task_identity, policy):
    from nfed.federation.flower.app import serve
    from nfed.federation.server import federate
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
    recorder = Recorder()
    nodes = {40 + i: {"pack": str(path)} for i, path in enumerate(packs.values())}
    grid = LoopbackGrid(nodes, rogue={node: recorder for node in nodes})
    train = profile_config("demo", width=WIDTH, batch_size=2, lr=0.001, seed=3)
    config = FederationConfig(rounds=2, eps=0.0, min_clients=3, seed=3, norm_policy=policy)
    flower = serve(grid, flat_run_config(train, config, tmp_path / "flower"), echo=lambda line: None)
    local = federate(packs, tmp_path / "local", train, config)

    kinds = {kind for kind, _ in recorder.sent}
    assert {"train", "evaluate"} <= kinds and recorder.replied
    for kind, names in recorder.sent + recorder.replied:
        assert names and not any(is_local(name, policy) for name in names), kind
    for name, value in local.global_weights.items():
        np.testing.assert_allclose(flower.global_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert [r["answered"] for r in flower.rounds] == [list(packs)] * 2
    for got, want in zip(flower.rounds, local.rounds):
        assert got["shared_bytes"] == want["shared_bytes"] and got["norm_policy"] == policy
        for district, entry in got["clients"].items():
            assert entry["bytes_down"] <= want["shared_bytes"] + (1 << 16)   # the shared tensors and a manifest
        for district, scores in got["global_val"].items():
            assert scores["f1"] == pytest.approx(want["global_val"][district]["f1"], abs=1e-6)
    for got, want in zip(flower.results, local.results):   # each district scored with its own BatchNorm
        assert got["district"] == want["district"] and got["f1"] == pytest.approx(want["f1"], abs=1e-6)
    state = grid.contexts[40].state.array_records
    assert any(key.startswith("nfed.local.") for key in state)   # the node kept its district's BatchNorm
    assert not (tmp_path / "flower" / "client_state").exists()  # the server never held it


def test_flower_app_takes_the_norm_policy_and_writes_it_into_the_run_config(tmp_path):
    from nfed.cli import cli
    from nfed.federation.flower.config import run_config_for, settings_from_run_config
    from nfed.training.trainer import TrainConfig

    config = run_config_for(TrainConfig(), FederationConfig(norm_policy="fedbn"), run_dir=tmp_path)
    assert config["norm-policy"] == "fedbn"
    flat = {k: v for k, v in config.items() if k != "train"}
    assert settings_from_run_config(flat).federation_config.norm_policy == "fedbn"
    del flat["norm-policy"]   # an app written before the key: the study's shared policy
    assert settings_from_run_config(flat).federation_config.norm_policy == "shared"
    assert "--norm-policy" in CliRunner().invoke(cli, ["flower-app", "--help"]).output


def test_secure_aggregation_sums_the_shared_tensors_alone(tmp_path, task_identity, monkeypatch):
    """Under SecAgg+ with fedbn the masked vector covers the shared tensors only; the run equals the in-process
    fedbn one within the quantisation error."""
    from test_secagg import QUANTISATION_ATOL, WireGrid, configs, serve_secure

    from nfed.federation.flower import secagg
    from nfed.federation.server import federate

    summed = []
    manifest_of = secagg.manifest_of
    monkeypatch.setattr(secagg, "manifest_of", lambda weights: summed.append(set(weights)) or manifest_of(weights))
    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
    grid = WireGrid({30 + i: {"pack": str(path)} for i, path in enumerate(packs.values())})
    secure, _ = serve_secure(tmp_path, packs, grid, norm_policy="fedbn")
    plain = federate(packs, tmp_path / "plain", configs(), FederationConfig(rounds=1, eps=0.0, norm_policy="fedbn"))
    assert summed and all(names and not any(is_local(n, "fedbn") for n in names) for names in summed)
    assert secure.rounds[0]["answered"] == list(packs)
    for name, value in plain.global_weights.items():
        np.testing.assert_allclose(secure.global_weights[name], value, rtol=0, atol=QUANTISATION_ATOL, err_msg=name)
    for got, want in zip(secure.results, plain.results):   # each node scores with the BatchNorm it kept
        assert got["f1"] == pytest.approx(want["f1"], abs=1e-3)
    assert all("nfed.local.1" in grid.contexts[node].state.array_records for node in grid.contexts)
