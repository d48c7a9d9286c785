"""RUN/status.json and `nfed status RUN`: running, finished or failed (and why), with exit codes scripts test."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_flower import make_tiny_packs  # noqa: E402  (plain pack writer; needs no Flower)

from nfed.federation.config import FederationConfig
from nfed.federation.server import federate
from nfed.runs.runlock import RunLock
from nfed.runs.runstatus import read_status, write_status
from nfed.training.trainer import profile_config


def status_of(run_dir):
    from nfed.cli import cli

    result = CliRunner().invoke(cli, ["status", str(run_dir)])
    return result.exit_code, result.output


def tiny_train():
    return profile_config("demo", width=4, batch_size=2, lr=0.001, seed=3)


@pytest.fixture
def packs(tmp_path):
    return make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1),) * 3)


def test_finished_run_and_a_refused_one_that_leaves_it_alone(tmp_path, packs):
    federate(packs, tmp_path / "run", tiny_train(), FederationConfig(rounds=2, eps=0.0))
    status = read_status(tmp_path / "run")
    assert (status["state"], status["round"], status["rounds"], status["best_round"]) == ("finished", 2, 2, 2)
    assert status["stop_reason"] == "round budget of 2 spent" and status["reason"] is None
    code, output = status_of(tmp_path / "run")
    assert code == 0 and "finished: round 2/2, best round 2; round budget of 2 spent" in output, output
    with pytest.raises(Exception, match="holds a federated run"):
        federate(packs, tmp_path / "run", tiny_train(), FederationConfig(rounds=1, eps=0.0))
    assert read_status(tmp_path / "run") == status


def test_failed_run_records_its_reason(tmp_path, packs):
    with pytest.raises(Exception, match="min-clients 5 exceeds"):
        federate(packs, tmp_path / "run", tiny_train(), FederationConfig(rounds=2, min_clients=5))
    code, output = status_of(tmp_path / "run")
    assert code == 1 and "failed: round 0/2; --min-clients 5 exceeds the 3 district(s) available" in output, output


def test_running_status_without_a_live_holder_is_a_killed_run(tmp_path):
    (tmp_path / "run").mkdir()
    write_status(tmp_path / "run", "running", round_number=1, rounds=2)
    code, output = status_of(tmp_path / "run")
    assert code == 1 and "ended without finishing after round 1 (killed?)" in output, output
    with RunLock(tmp_path / "run"):
        code, output = status_of(tmp_path / "run")
    assert code == 3 and "running: round 1/2" in output, output
    code, output = status_of(tmp_path / "run")
    assert code == 1, output                                        # the lock was released: killed again


def test_unreadable_or_missing_status(tmp_path):
    (tmp_path / "run").mkdir()
    code, output = status_of(tmp_path / "run")
    assert code == 1 and "status.json: not found" in output
    (tmp_path / "run" / "status.json").write_text("[]")
    code, output = status_of(tmp_path / "run")
    assert code == 1 and "status.json: not a run status" in output, output
    (tmp_path / "run" / "status.json").write_text('{"state": "running", "round": NaN}')
    assert status_of(tmp_path / "run")[0] == 1
    code, output = status_of(tmp_path / "elsewhere")
    assert code == 1 and "run folder not found" in output
