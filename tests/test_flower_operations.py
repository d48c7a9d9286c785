"""Operating nfed over Flower (issue 17), through the real ServerApp code (nfed.federation.flower.app.serve) over the
in-process grid of test_flower: nodes that restart, die or were not planned, the evaluation deadline, one message per
node and round, and RUN/status.json. The same checks on a real SuperLink and SuperNodes are in test_flower.py (slow).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from flower_harness import flwr_available
from test_flower import DISTRICTS, WIDTH, LoopbackGrid, flat_run_config, load_global, make_tiny_packs, task_identity

if flwr_available():
    from nfed.federation.flower.app import serve

pytestmark = [pytest.mark.flower,
              pytest.mark.skipif(not flwr_available(), reason="flwr is not installed (the flower extra)")]
__all__ = ["task_identity"]   # the fixture, used by name


def rounds_of(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def csv_districts(run_dir):
    return [row.split(",")[0] for row in (run_dir / "federated.csv").read_text().splitlines()[1:]]


def sent_to(grid, node, kind):
    return sum(1 for n, k in grid.sent if n == node and k == kind)


def status_of(run_dir):
    from nfed.cli import cli

    result = CliRunner().invoke(cli, ["status", str(run_dir)])
    return result.exit_code, result.output


def tiny_train():
    from nfed.training.trainer import profile_config

    return profile_config("demo", width=WIDTH, batch_size=2, lr=0.001, seed=3)


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_evaluation_travels_with_the_next_rounds_training_and_changes_nothing(tmp_path, task_identity, eps):
    """One message per node and round: round r's validation goes with round r+1's training. Weights, rounds and
    federated.csv equal the in-process run's; with eps=1 the run stops after round 1 and the training sent
    ahead for round 2 is discarded, as in-process."""
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
    grid = LoopbackGrid({10 + i: {"pack": str(path)} for i, path in enumerate(packs.values())})
    fed = FederationConfig(rounds=2, eps=eps, min_clients=3, seed=3, warmup_rounds=0)   # the rule may fire at once
    result = serve(grid, flat_run_config(tiny_train(), fed, tmp_path / "flower"), echo=lambda line: None)
    local = federate(packs, tmp_path / "local", tiny_train(), fed)
    assert [r["round"] for r in result.rounds] == [r["round"] for r in local.rounds] == ([1, 2] if eps == 0 else [1])
    saved = load_global(tmp_path / "flower")
    for name, value in local.global_weights.items():
        np.testing.assert_allclose(result.global_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(saved[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for mine, theirs in zip(result.rounds, local.rounds):
        assert mine["answered"] == theirs["answered"] == list(DISTRICTS)
        assert mine["mean_val_loss"] == pytest.approx(theirs["mean_val_loss"], rel=1e-5)
        assert mine["global_val"].keys() == theirs["global_val"].keys()
    assert (tmp_path / "flower" / "federated.csv").read_text() == (tmp_path / "local" / "federated.csv").read_text()
    for node in (10, 11, 12):   # train rounds 1-2 (round 1 evaluated with round 2's); round 2's val; test
        assert sent_to(grid, node, "train") == 2
        assert sent_to(grid, node, "evaluate") == (2 if eps == 0 else 1)
    assert status_of(tmp_path / "flower")[0] == 0


def test_restarted_node_rejoins_and_a_dead_one_costs_no_second_wait(tmp_path, task_identity):
    """After round 1 the Gwangjin-gu node restarts under a new id and the Gangdong-gu node dies (still listed
    until the SuperLink reports it unavailable). Gwangjin-gu takes part in the next exchange and gets its
    federated.csv row; Gangdong-gu's rounds say what happened, with the time it took, and it is not asked
    to evaluate a round whose training it missed."""
    from nfed.federation.config import FederationConfig

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1),) * 3)
    grid = LoopbackGrid({1: {"pack": str(packs["Gangnam-gu"])}, 2: {"pack": str(packs["Gangdong-gu"])},
                         3: {"pack": str(packs["Gwangjin-gu"])}})
    lines = []

    def operator(line):
        lines.append(line)
        if line.startswith("round 1/3"):
            del grid.contexts[3]
            grid.add(13, {"pack": str(packs["Gwangjin-gu"])})
            grid.dead[2] = 0.3

    fed = FederationConfig(rounds=3, eps=0.0, deadline=30.0)
    result = serve(grid, flat_run_config(tiny_train(), fed, tmp_path / "run", eval_deadline=20.0), echo=operator)
    first, second, third = result.rounds
    assert first["answered"] == second["answered"] == list(DISTRICTS)   # round 2 trained with round 1's evaluation
    assert "SuperNode 13: Gwangjin-gu (tile 32, train 2, val 1, test 1)" in lines
    assert sorted(second["global_val"]) == ["Gangnam-gu", "Gwangjin-gu"]
    assert third["answered"] == ["Gangnam-gu", "Gwangjin-gu"]
    reason = third["failed"]["Gangdong-gu"]
    assert reason.startswith("SuperNode 2 unavailable after") and "heartbeats stopped" in reason, reason
    assert 0.3 <= third["clients"]["Gangdong-gu"]["seconds"] < 5.0      # the true time, not the 30 s deadline
    assert "Gangdong-gu" not in third["global_val"]
    assert any("not asked to evaluate: in this round's training, SuperNode 2 unavailable" in line for line in lines)
    assert sent_to(grid, 2, "evaluate") == 1                             # the test split only, not round 3's
    assert sent_to(grid, 3, "train") == 2 and sent_to(grid, 13, "train") == 1
    assert csv_districts(tmp_path / "run") == ["Gangnam-gu", "Gwangjin-gu"]
    assert all(r["seconds"] < 10 for r in result.rounds)


def test_allow_list_refuses_outsiders_and_duplicates_without_failing_the_run(tmp_path, task_identity):
    """--districts Gangnam-gu,Gangdong-gu,Gwangjin-gu,Jung-gu: a Mapo-gu node is refused, a second Gangdong-gu
    node (same pack) is refused and kept as a standby, Gwangjin-gu joins after round 1, Jung-gu never comes.
    The run federates the allowed districts that are there; the standby takes over when its node leaves."""
    from nfed.federation.config import FederationConfig

    packs = make_tiny_packs(tmp_path / "packs", DISTRICTS + ("Mapo-gu",), counts=((2, 1, 1),) * 4)
    grid = LoopbackGrid({1: {"pack": str(packs["Gangnam-gu"])}, 2: {"pack": str(packs["Gangdong-gu"])},
                         4: {"pack": str(packs["Mapo-gu"])}, 5: {"pack": str(packs["Gangdong-gu"])}})
    lines = []

    def operator(line):
        lines.append(line)
        if line.startswith("round 1/2"):
            grid.add(6, {"pack": str(packs["Gwangjin-gu"])})
            del grid.contexts[2]

    allowed = ["Gangnam-gu", "Gangdong-gu", "Gwangjin-gu", "Jung-gu"]
    fed = FederationConfig(rounds=2, eps=0.0, deadline=30.0, min_clients=2)
    result = serve(grid, flat_run_config(tiny_train(), fed, tmp_path / "run", districts=allowed,
                                         connect_timeout=1.0), echo=operator)
    assert "SuperNode 4 (Mapo-gu) refused: district 'Mapo-gu' is not in the allow-list (--districts)" in lines
    duplicate = "SuperNode 5 (Gangdong-gu) refused for now: a duplicate of SuperNode 2"
    assert any(line.startswith(duplicate) for line in lines)
    assert "no SuperNode serves Gwangjin-gu, Jung-gu yet (a district takes part once one does)" in lines
    first, second = result.rounds
    assert first["selected"] == allowed and first["answered"] == ["Gangnam-gu", "Gangdong-gu"]
    assert first["failed"] == {"Gwangjin-gu": "no SuperNode serves it", "Jung-gu": "no SuperNode serves it"}
    assert "SuperNode 5 now serves Gangdong-gu (SuperNode 2 is no longer connected)" in lines
    assert second["answered"] == ["Gangnam-gu", "Gangdong-gu", "Gwangjin-gu"]
    assert sent_to(grid, 4, "train") == sent_to(grid, 4, "evaluate") == 0
    assert sent_to(grid, 5, "train") == 0 and sent_to(grid, 5, "evaluate") == 2   # round 2's validation, test
    assert sent_to(grid, 6, "train") == 1
    assert csv_districts(tmp_path / "run") == ["Gangnam-gu", "Gangdong-gu", "Gwangjin-gu"]
    assert status_of(tmp_path / "run")[0] == 0


def test_serve_that_cannot_start_leaves_a_failed_status(tmp_path, task_identity):
    """A ServerApp that cannot start the run leaves status.json failed with the one-line reason, which
    `nfed status` prints, exiting 1 (`flwr run` exits 0 whatever became of the run)."""
    from nfed.common.errors import DataError
    from nfed.federation.config import FederationConfig

    grid = LoopbackGrid({1: {"pack": str(tmp_path / "missing.h5")}})
    config = flat_run_config(tiny_train(), FederationConfig(rounds=2), tmp_path / "run", connect_timeout=1.0)
    with pytest.raises(DataError, match="no SuperNode could describe its district pack"):
        serve(grid, config, echo=lambda line: None)
    code, output = status_of(tmp_path / "run")
    assert code == 1 and "failed: round 0/2; no SuperNode could describe its district pack" in output, output


def test_exchange_tells_a_refused_push_from_silence(task_identity):
    """A message the SuperLink refuses (node no longer registered) is reported at once, not as late."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from nfed.federation.flower.exchange import exchange

    grid = LoopbackGrid({})
    reply = exchange(grid, {"x": Message(RecordDict({"setup": ConfigRecord({"a": "1"})}), dst_node_id=7,
                                         message_type=MessageType.QUERY)}, timeout=30.0)["x"]
    assert reply.pushed is False and reply.seconds == 0.0
    assert reply.silence(7, 30.0) == "SuperNode 7 could not be reached (the SuperLink no longer lists it)"


def test_flower_app_writes_the_allow_list_and_the_evaluation_deadline(tmp_path):
    from flwr.common.config import get_fused_config_from_dir

    from nfed.cli import cli
    from nfed.federation.flower.config import settings_from_run_config

    def flower_app(*options):
        return CliRunner().invoke(cli, ["flower-app", "--out", str(tmp_path / "app"), "--run-dir",
                                        str(tmp_path / "run"), *options])

    names = tmp_path / "districts.txt"
    names.write_text("# planned districts\nGangnam-gu\n\nJung-gu  # joins later\n")
    result = flower_app("--districts-file", str(names), "--eval-deadline", "45", "--deadline", "300")
    assert result.exit_code == 0 and "districts Gangnam-gu, Jung-gu" in result.output, result.output
    settings = settings_from_run_config(get_fused_config_from_dir(tmp_path / "app", {}))
    assert settings.districts == ["Gangnam-gu", "Jung-gu"] and settings.eval_deadline == 45.0
    settings = settings_from_run_config(get_fused_config_from_dir(tmp_path / "app", {"districts": "",
                                                                                     "eval-deadline": 0.0}))
    assert settings.districts is None and settings.eval_deadline is None          # any district; wait for all

    for options, problem in [(("--districts", "Jung-gu", "--districts-file", str(names)), "give one of them"),
                             (("--districts-file", str(tmp_path / "none.txt")), "none.txt not found"),
                             (("--districts", "Jung-gu,Jung-gu"), "named twice"),
                             (("--districts", "Jung-gu", "--min-clients", "2"), "exceeds the 1 district"),
                             (("--eval-deadline", "-1"), "--eval-deadline")]:
        result = flower_app(*options)
        assert result.exit_code == 1 and problem in result.output, (options, result.output)
