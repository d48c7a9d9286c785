"""Issue 11, items 4 and 5: full or read-only disks, leftovers of killed runs, permissions, and run folders
shared by two runs, resumed with other data, or holding worker processes when their server dies.

The full-disk tests mount a small tmpfs (as root; skipped otherwise); the lock and orphan tests start real
processes and kill them with SIGKILL / SIGTERM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_federation import INITIAL, FakeTrainConfig, fake_evaluate, fake_train
from test_training import synthetic_pack

from nfed.cli import cli
from nfed.common.errors import CheckpointError, ConfigError, OutputError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "2", "--batch-size", "4", "--quiet"]


def nfed_process(*args, **options) -> subprocess.CompletedProcess:
    """`nfed ARGS` in a fresh process (a crash there cannot take the test down with it)."""
    return subprocess.run([sys.executable, "-m", "nfed.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, **options)


def assert_one_line(process: subprocess.CompletedProcess, *needles: str) -> None:
    output = process.stdout + process.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert process.returncode == 1 and len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], errors[0]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("packs")
    for index, district in enumerate(("A-gu", "B-gu", "C-gu")):
        synthetic_pack(folder / f"{district}.h5", district, counts=(4, 2, 2), tile=32, seed=index)
    return folder


# ------------------------------------------------------------------------------------------ 4. disks

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root only); filled to `fill(free_bytes)` by the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def _fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_full_and_read_only_disks_fail_in_one_line_and_keep_what_was_there(small_disk, packs, tmp_path):
    disk = small_disk
    keep = disk / "results" / "Old-gu.h5"
    keep.parent.mkdir()
    keep.write_bytes((packs / "A-gu.h5").read_bytes())
    before = keep.read_bytes()
    synth = nfed_process("synth", "--out", tmp_path / "synth", "--scale", "0.001", "--tile", "32",
                         "--districts", "Jung-gu,Jongno-gu", "--quiet")
    assert synth.returncode == 0, synth.stderr
    _fill(disk, 48 * 1024)

    process = nfed_process("pack", tmp_path / "synth", "--out", disk / "results", "--quiet")
    assert_one_line(process, str(disk / "results"), "No space left on device")
    process = nfed_process("train-local", "--data", packs / "A-gu.h5", "--out", disk / "local", "--epochs", "1",
                           *TINY)
    assert_one_line(process, str(disk / "local"), "No space left on device")
    process = nfed_process("federate", "--data", packs, "--out", disk / "fed", "--rounds", "1", *TINY)
    assert_one_line(process, str(disk / "fed" / "global.h5"), "No space left on device")
    assert temporaries(disk) == []
    assert keep.read_bytes() == before and sorted(p.name for p in keep.parent.iterdir()) == ["Old-gu.h5"]

    (disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    process = nfed_process("pack", tmp_path / "synth", "--out", disk / "results", "--quiet")
    assert_one_line(process, str(disk / "results"), "Read-only file system")
    assert keep.read_bytes() == before


def test_unwritable_output_is_one_line(monkeypatch, tmp_path):
    """EACCES (root is never refused, so the refusal is simulated where nfed creates its temporary file)."""
    import nfed.common.atomic

    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(nfed.common.atomic.os, "open", refuse)
    with pytest.raises(OutputError, match=r"out.json: cannot write \(Permission denied\)"):
        nfed.common.atomic.write_json_atomic(tmp_path / "out.json", {})
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_dead_writers_are_removed_and_outputs_follow_the_umask(tmp_path, packs):
    from nfed.common import atomic
    from nfed.model.checkpoint import save_checkpoint

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = atomic.temporary_name(tmp_path / "x.json").name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    stale_dir = atomic.temporary_name(tmp_path / "Jung-gu").name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    live_file = atomic.temporary_name(tmp_path / "y.json").name
    (tmp_path / stale_file).write_text("half")
    (tmp_path / stale_dir).mkdir()
    (tmp_path / live_file).write_text("being written")
    (tmp_path / ".x.json.abcdefgh.tmp").write_text("not ours")
    atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".x.json.abcdefgh.tmp", live_file, "x.json"])

    old = os.umask(0o027)
    try:
        atomic.write_json_atomic(tmp_path / "u" / "m.json", {})
        save_checkpoint(tmp_path / "u" / "c.h5", {"w": np.ones(2, np.float32)})
        atomic.make_folder(tmp_path / "u" / "sub")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "u").iterdir()}
    assert modes == {"m.json": 0o640, "c.h5": 0o640, "sub": 0o750}
    assert (tmp_path / "u").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------------------------------ 5. run folders

def _fake_run(run_dir, packs=None, **options):
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate

    paths = {name: (packs / f"{name}.h5" if packs else Path(f"/nonexistent/{name}.h5"))
             for name in ("A-gu", "B-gu", "C-gu")}
    config = FederationConfig(**{"rounds": 2, **options.pop("config", {})})
    return federate(paths, run_dir, FakeTrainConfig(), config, train_fn=fake_train, evaluate_fn=fake_evaluate,
                    initial_weights=INITIAL, **options)


def test_a_finished_run_is_only_replaced_with_overwrite(tmp_path):
    first = _fake_run(tmp_path / "run")
    before = (tmp_path / "run" / "federated.csv").read_bytes()
    with pytest.raises(ConfigError, match="holds a federated run .*--resume continues it, --overwrite replaces it"):
        _fake_run(tmp_path / "run", config={"rounds": 1})
    assert (tmp_path / "run" / "federated.csv").read_bytes() == before
    again = _fake_run(tmp_path / "run", overwrite=True, config={"rounds": 1})
    assert len(again.rounds) == 1 and len(first.rounds) == 2


def test_resume_checks_the_data_and_the_round_history(tmp_path, packs):
    run = tmp_path / "run"
    _fake_run(run, packs, config={"rounds": 1})
    other = tmp_path / "other"
    other.mkdir()
    for name in ("A-gu", "B-gu"):
        (other / f"{name}.h5").write_bytes((packs / f"{name}.h5").read_bytes())
    synthetic_pack(other / "C-gu.h5", "C-gu", counts=(4, 2, 2), tile=32, seed=9)
    with pytest.raises(ConfigError, match="other data than the run was started with: C-gu's pack has changed"):
        _fake_run(run, other, resume=True)

    rounds = run / "rounds.jsonl"
    text = rounds.read_text()
    rounds.write_text(text.replace('"answered"', '"answered_"'))
    with pytest.raises(CheckpointError, match="round history does not match"):
        _fake_run(run, packs, resume=True)
    rounds.unlink()
    with pytest.raises(CheckpointError, match=r"rounds none on file, the checkpoint is after round 1"):
        _fake_run(run, packs, resume=True)
    rounds.write_text(text)
    assert len(_fake_run(run, packs, resume=True).rounds) == 2


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine" / "synth" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("precious")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "mine"), "--quiet"])
    assert result.exit_code == 1 and "not empty and not an nfed demo folder" in result.output, result.output
    assert mine.read_text() == "precious"


HANGING_DRIVER = textwrap.dedent('''
    """A federation whose worker clients hang: it holds the run folder until killed."""
    import signal, sys, time
    from pathlib import Path

    from nfed.cli import _terminate
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import Federation
    from nfed.runs.packs import find_packs
    from nfed.training.trainer import profile_config
    from nfed.federation.worker import WorkerRunner

    signal.signal(signal.SIGTERM, _terminate)      # what `nfed` installs
    packs, run = Path(sys.argv[1]), Path(sys.argv[2])
    runner = WorkerRunner(2, run / "work", client_function="hangclient:train")
    config = FederationConfig(rounds=1, eps=1e-3, workers=2)
    Federation(find_packs(packs), run, profile_config("demo", width=2, batch_size=4), config,
               runner=runner).run()
''')
HANGING_CLIENT = "import time\n\ndef train(*args, **kwargs):\n    time.sleep(600)\n"


def _workers_of(pid: int) -> list[int]:
    """PIDs of the nfed.federation.worker processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"nfed.federation.worker" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_holder(tmp_path: Path, packs: Path, run: Path) -> tuple[subprocess.Popen, list[int]]:
    (tmp_path / "driver.py").write_text(HANGING_DRIVER)
    (tmp_path / "hangclient.py").write_text(HANGING_CLIENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    holder = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(packs), str(run)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_workers_of(holder.pid)) < 2:
        assert holder.poll() is None, holder.stderr.read().decode()
        time.sleep(0.1)
    workers = _workers_of(holder.pid)
    assert len(workers) == 2
    return holder, workers


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # do not leave them running, whatever the assertion says
        os.kill(pid, signal.SIGKILL)
    return left


def test_run_folder_lock_and_workers_that_die_with_their_server(tmp_path, packs):
    """A second federate into a busy folder is refused; SIGKILL of the server leaves no worker and a stale
    lock that the next run reports (and resumes from); SIGTERM cleans up and releases the lock."""
    run = tmp_path / "run"
    holder, workers = _start_holder(tmp_path, packs, run)
    try:
        second = nfed_process("federate", "--data", packs, "--out", run, "--rounds", "1", *TINY)
        assert_one_line(second, str(run), f"in use by another nfed run (pid {holder.pid}")
        assert "federating" not in second.stdout  # a refused run announces no plan
    finally:
        holder.kill()
        holder.wait()
    assert _wait_gone(workers) == []
    assert (run / ".nfed.lock").read_text().startswith(f"pid {holder.pid}")

    resumed = nfed_process("federate", "--data", packs, "--out", run, "--rounds", "1", "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "did not end cleanly" in resumed.stdout and f"pid {holder.pid}" in resumed.stdout
    assert not (run / "work").exists() and (run / ".nfed.lock").read_text() == ""

    holder, workers = _start_holder(tmp_path, packs, tmp_path / "run2")
    holder.send_signal(signal.SIGTERM)
    holder.wait(timeout=30)
    assert _wait_gone(workers) == []
    assert (tmp_path / "run2" / ".nfed.lock").read_text() == ""   # released cleanly
    assert not (tmp_path / "run2" / "work" / "round-1").exists()
