"""The seams between layers (issue 27): one owner of the run folder, the device parsed once, named interfaces."""
from __future__ import annotations

import sys
from collections import Counter
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner
from test_federation import INITIAL, PACKS, FakeTrainConfig, fake_evaluate, fake_train
from test_flower import make_tiny_packs

from nfed.common import backend
from nfed.common.errors import DeviceError
from nfed.federation.config import FederationConfig
from nfed.federation.server import federate
from nfed.gpu.precision import get_precision
from nfed.runs import runfolder, runlock
from nfed.runs.runfolder import recorded_run
from nfed.runs.runlock import RunFolderBusy, RunLock
from nfed.runs.runstatus import read_status
from nfed.training.environment import RunEnvironment

HOOKS = dict(train_fn=fake_train, evaluate_fn=fake_evaluate, initial_weights=INITIAL, evaluate_test=False)


def counting_holds(call):
    """How often `call()` takes a run folder's lock and checks the folder (whatever module calls them)."""
    watched = {RunLock.__enter__.__code__: "lock", runfolder.check_run_folder.__code__: "check"}
    counts = Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            counts[watched[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return dict(counts)


# ------------------------------------------------------------------------------------------ one owner of the folder

def test_federate_locks_and_checks_its_folder_once_fresh_and_resumed(tmp_path):
    run = tmp_path / "run"
    assert counting_holds(lambda: federate(PACKS, run, FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0),
                                           **HOOKS)) == {"lock": 1, "check": 1}
    assert counting_holds(lambda: federate(PACKS, run, FakeTrainConfig(), FederationConfig(rounds=2, eps=0.0),
                                           resume=True, **HOOKS)) == {"lock": 1, "check": 1}
    assert read_status(run)["state"] == "finished"


def test_the_federate_command_hands_in_its_plan_and_holds_the_folder_once(tmp_path):
    from nfed.cli import cli

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1),) * 2, districts=("Jung-gu", "Jongno-gu"))
    args = ["federate", "--data", str(tmp_path / "packs"), "--out", str(tmp_path / "run"), "--rounds", "1",
            "--width", "2", "--batch-size", "2", "--no-round-eval", "--quiet", "--device", "cpu"]
    results = []
    counts = counting_holds(lambda: results.append(CliRunner().invoke(cli, args)))
    assert results[0].exit_code == 0, results[0].output
    assert counts == {"lock": 1, "check": 1}
    assert results[0].output.startswith(f"federating {len(packs)} district(s)"), results[0].output
    refused = CliRunner().invoke(cli, args)   # the folder holds a run: refused before the plan is said
    assert refused.exit_code == 1 and "federating" not in refused.output
    assert refused.output.count("\n") == 1 and "holds a federated run" in refused.output, refused.output


def test_a_plan_is_said_only_by_a_run_that_holds_and_checked_its_folder(tmp_path):
    lines = []
    federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), echo=lines.append,
             plan="the plan", **HOOKS)
    assert lines[0] == "the plan" and lines.count("the plan") == 1
    lines.clear()
    with pytest.raises(Exception, match="holds a federated run"):
        federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), echo=lines.append,
                 plan="the plan", **HOOKS)
    assert lines == []


def test_a_caller_that_holds_the_folder_hands_it_in(tmp_path):
    """Flower's ServerApp holds the run folder while its nodes connect and hands the held run to federate."""
    run = tmp_path / "run"

    def serve():
        with recorded_run(run, resume=False, overwrite=False, rounds=1) as held:
            assert read_status(run)["state"] == "running"
            federate(PACKS, run, FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), held=held, **HOOKS)

    assert counting_holds(serve) == {"lock": 1, "check": 1}
    assert read_status(run)["state"] == "finished"
    with recorded_run(tmp_path / "other", resume=False, overwrite=False, rounds=1) as held:
        with pytest.raises(ValueError, match="holds"):
            federate(PACKS, run, FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), held=held, **HOOKS)


def test_a_second_hold_of_a_held_folder_is_refused_not_shared(tmp_path):
    """No re-entrancy: whoever holds a folder hands it on; a second hold in the same process is a bug, refused."""
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderBusy, match="in use by another nfed run"):
            with RunLock(tmp_path / "run"):
                pass
        with pytest.raises(RunFolderBusy):
            federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), **HOOKS)
    assert not hasattr(runlock, "_held") and not hasattr(runfolder, "_recording")
    federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), **HOOKS)   # released


def test_a_stale_lock_is_reported_once_by_the_owner(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_NAME).write_text("pid 123 on host, 'nfed federate', started 2024-01-01T00:00:00+00:00")
    lines = []
    federate(PACKS, run, FakeTrainConfig(), FederationConfig(rounds=1, eps=0.0), echo=lines.append, **HOOKS)
    assert sum("did not end cleanly (pid 123 on host" in line for line in lines) == 1, lines


# ------------------------------------------------------------------------------------------ the device parsed once

def test_the_environment_holds_a_parsed_device():
    env = RunEnvironment.from_options("CPU", "tf32")
    assert env.device is backend.CPU and isinstance(env.device, backend.Device)
    assert env.to_dict() == {"device": "cpu", "precision": "tf32"} and RunEnvironment.from_dict(env.to_dict()) == env
    with pytest.raises(DeviceError, match="bad device 'tpu'"):
        RunEnvironment("tpu")


@pytest.mark.skipif(backend.cupy_available(), reason="needs a machine without a usable GPU")
def test_the_same_environment_on_a_gpu_is_checked_here():
    with pytest.raises(DeviceError, match="cuda:1"):
        RunEnvironment("cpu", "bf16").on_gpu(1)


@pytest.mark.gpu
def test_the_same_environment_on_gpu_i():
    env = RunEnvironment("cpu", "bf16")
    assert env.on_gpu(0) == RunEnvironment(backend.Device("cuda", 0), "bf16")
    with pytest.raises(DeviceError, match=f"only {backend.gpu_count()} GPU"):
        env.on_gpu(backend.gpu_count())


def test_precision_travels_in_the_environment_not_in_a_process_setting():
    from nfed.commands.options import precision_option, run_environment

    seen = []

    @click.command()
    @precision_option
    def command(precision):
        seen.append(run_environment("cpu", precision))

    before = get_precision()
    other = "bf16" if before != "bf16" else "tf32"
    assert CliRunner().invoke(command, ["--precision", other]).exit_code == 0
    assert seen[0].precision == other and get_precision() == before


def test_a_flower_node_checks_its_device():
    pytest.importorskip("flwr")
    from nfed.federation.flower.app import node_environment

    assert node_environment(SimpleNamespace(node_config={"device": "cpu", "precision": "bf16"})) == \
        RunEnvironment("cpu", "bf16")
    with pytest.raises(DeviceError, match="bad device 'tpu:0'"):
        node_environment(SimpleNamespace(node_config={"device": "tpu:0"}))


# ------------------------------------------------------------------------------------------ named interfaces

def test_every_aggregator_is_an_aggregator_and_refuses_alike():
    import numpy as np

    from nfed.federation.aggregator import Aggregator
    from nfed.federation.privacy import DPFedAvgAggregator, SecureAggregate, SecureSumAggregator
    from nfed.federation.robust import build_aggregator

    reference = {"w": np.zeros(3, np.float32)}
    aggregators = [build_aggregator(FederationConfig(aggregator=name), reference)
                   for name in ("fedavg", "median", "trimmed-mean", "multi-krum", "clipped")]
    aggregators += [DPFedAvgAggregator(reference, 1.0, 0.0),
                    SecureSumAggregator(reference, SecureAggregate(None, 0.0, []))]
    for aggregator in aggregators:
        assert isinstance(aggregator, Aggregator), type(aggregator)
        assert (aggregator.total_samples, aggregator.rejected, aggregator.problem) == (0, {}, None)
    for aggregator in aggregators[:-1]:
        assert not aggregator.add({"w": np.full(3, np.nan, np.float32)}, 4, "Jung-gu")
        assert "NaN" in aggregator.rejected["Jung-gu"] and aggregator.accepted == []


def test_runners_are_named_by_what_they_can_do(tmp_path):
    from nfed.federation.district_jobs import PoolRunner
    from nfed.federation.runners import NodeRunner, Runner, SecureRunner, SequentialRunner
    from nfed.federation.worker import WorkerRunner

    for runner in (SequentialRunner(fake_train), WorkerRunner(2, tmp_path), PoolRunner(None, tmp_path, PACKS)):
        assert isinstance(runner, Runner) and not isinstance(runner, (SecureRunner, NodeRunner))
    with pytest.raises(Exception, match="secure aggregation runs over Flower"):
        federate(PACKS, tmp_path / "run", FakeTrainConfig(),
                 FederationConfig(rounds=1, eps=0.0, secure_aggregation=True), runner=SequentialRunner(fake_train),
                 **HOOKS)
