"""One hostile district cannot outweigh, impersonate or silently shut out another: every claimed sample count is
capped at what its pack announced when it joined, a round that leaves districts or nodes out says so in
RUN/status.json, and a run in which no update was ever accepted ends as failed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_federation import FakeTrainConfig, fake_evaluate
from test_flower import make_tiny_packs

from nfed.common.errors import TrainingError
from nfed.federation.client import ClientResult
from nfed.federation.config import FederationConfig
from nfed.federation.roster import AnnouncedCounts, Roster
from nfed.federation.server import federate
from nfed.runs.runfolder import read_rounds
from nfed.runs.runstatus import read_status, status_line

INITIAL = {"w": np.zeros(3, np.float32)}
TARGET = {"Jung-gu": 1.0, "Nowhere-gu": -1000.0}   # Nowhere-gu: allow-listed, absent from data/districts.csv


def inflating_train(global_weights, setup, pack_path, *, optimizer_state=None, env=None):
    """Honest Jung-gu (its pack's count); Nowhere-gu pulls towards -1000 and claims 10^9 samples."""
    district = Path(pack_path).stem
    weights = {k: np.full_like(v, TARGET[district]) for k, v in global_weights.items()}
    claim = 10**9 if district == "Nowhere-gu" else 4
    return ClientResult(weights, claim, {"train_loss": 1.0, "val_loss": 1.0, "val_f1": 0.5, "wall_time_s": 0.1})


def test_a_claim_above_the_count_its_pack_announced_is_capped_in_process(tmp_path):
    packs = make_tiny_packs(tmp_path / "packs", districts=("Jung-gu", "Nowhere-gu"), counts=((4, 2, 2), (3, 2, 2)))
    result = federate(packs, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1),
                      train_fn=inflating_train, evaluate_fn=fake_evaluate, initial_weights=INITIAL)
    # weighed by the packs' own counts 4 and 3, not 4 and 10^9 (which gives about -1000: the model zeroed)
    np.testing.assert_allclose(result.global_weights["w"], (4 * 1.0 + 3 * -1000.0) / 7, rtol=1e-6)
    entry = read_rounds(tmp_path / "run" / "rounds.jsonl")[0]["clients"]["Nowhere-gu"]
    assert entry["weight"] == 3 and entry["capped"] == "claimed 1000000000 samples, announced 3"
    status = read_status(tmp_path / "run")
    assert status["round_problems"] == {"Nowhere-gu": "capped: claimed 1000000000 samples, announced 3"}
    assert "left out 1: Nowhere-gu (capped" in status_line(status)


def test_over_flower_the_cap_is_the_count_the_node_announced_when_it_joined(tmp_path):
    roster = Roster(["Jung-gu", "Nowhere-gu"], echo=lambda line: None)
    announced = AnnouncedCounts(roster)
    assert dict(announced) == {}
    roster.admit({1: {"district": "Jung-gu", "tile": 32, "samples": {"train": 4}},
                  2: {"district": "Nowhere-gu", "tile": 32, "samples": {"train": 3}}})
    assert dict(announced) == {"Jung-gu": 4, "Nowhere-gu": 3}      # live: the districts as they join
    packs = {d: Path(f"/remote/{d}") for d in TARGET}
    result = federate(packs, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1),
                      train_fn=inflating_train, evaluate_fn=fake_evaluate, initial_weights=INITIAL,
                      train_samples=announced)
    np.testing.assert_allclose(result.global_weights["w"], (4 * 1.0 + 3 * -1000.0) / 7, rtol=1e-6)


def test_a_run_in_which_no_update_was_ever_accepted_fails(tmp_path):
    def broken(global_weights, setup, pack_path, **kwargs):
        raise RuntimeError("disk on fire")

    packs = {d: Path(f"/nonexistent/{d}.h5") for d in TARGET}
    with pytest.raises(TrainingError, match="no district's update was accepted in any of the 2 round"):
        federate(packs, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=2), train_fn=broken,
                 evaluate_fn=fake_evaluate, initial_weights=INITIAL)
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "no district's update was accepted" in status["reason"]
    assert set(status["round_problems"]) == set(TARGET)
    assert not (tmp_path / "run" / "federated.csv").exists()


def test_nfed_status_shows_what_nodes_said_escaped(tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli
    from nfed.runs.runstatus import write_status

    write_status(tmp_path, "finished", round_number=1, rounds=1, problems={"Jung-gu": "failed: \x1b[2Jgone"})
    for options in ([], ["--json"]):
        result = CliRunner().invoke(cli, ["status", str(tmp_path), *options])
        assert result.exit_code == 0 and "\x1b" not in result.output and "[2Jgone" in result.output
