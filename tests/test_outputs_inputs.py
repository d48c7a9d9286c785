"""Issue 25, items 4-6: an output never replaces an input, two packs of one district are refused, and the run
folder's lock and state files are never followed through links.

Every refusal is one `Error:` line with exit status 1, and leaves the inputs and the output's parent as they were.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_runs import make_run
from test_cli_model import _one_line_error as one_line_error
from test_cli_model import invoke
from test_training import synthetic_pack

from nfed.model.checkpoint import save_checkpoint
from nfed.model.wnet import WNetCD

TRAIN = ["--batch-size", "4", "--epochs", "1", "--quiet", "--device", "cpu"]
TINY = ["--width", "2", *TRAIN]
SECRET = "not nfed's: must stay as it is\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as their own name) and its bytes: what a refusal must leave alone."""
    return {str(p.relative_to(folder)): (b"" if p.is_dir() or p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    net = WNetCD(width=4, classes=2, lambda_rec=0.0, rng=np.random.default_rng(0))
    return save_checkpoint(folder / "best.h5", net.state_dict(),
                           config={"width": 4, "classes": 2, "lambda_rec": 0.0, "tile": 32})


@pytest.fixture
def pairs(tmp_path) -> Path:
    """PAIRS/A/t1.png and PAIRS/B/t1.png (40x40)."""
    rng = np.random.default_rng(1)
    for side in ("A", "B"):
        (tmp_path / "pairs" / side).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "pairs" / side / "t1.png")
    return tmp_path / "pairs"


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("packs")
    for index, district in enumerate(("Jung-gu", "Nowon-gu")):
        synthetic_pack(folder / f"{district}.h5", district, counts=(4, 2, 2), tile=32, seed=index)
    return folder


@pytest.fixture(scope="module")
def twin_packs(tmp_path_factory) -> Path:
    """Two pack files that both claim district Jung-gu (and one other district)."""
    folder = tmp_path_factory.mktemp("twins")
    synthetic_pack(folder / "a.h5", "Jung-gu", counts=(4, 2, 2), tile=32, seed=0)
    synthetic_pack(folder / "b.h5", "Jung-gu", counts=(4, 2, 2), tile=32, seed=1)
    synthetic_pack(folder / "Nowon-gu.h5", "Nowon-gu", counts=(4, 2, 2), tile=32, seed=2)
    return folder


# ------------------------------------------------------------------------------------------ 4. outputs over inputs

def test_predict_refuses_to_write_its_mask_over_the_past_image(model, pairs):
    before = snapshot(pairs)
    past, current = pairs / "A" / "t1.png", pairs / "B" / "t1.png"
    one_line_error(invoke("predict", "--model", model, "--past", past, "--current", current, "--out", past,
                          "--quiet"), "--out", "is the input --past", "refusing to overwrite an input")
    one_line_error(invoke("predict", "--model", model, "--past", past, "--current", current, "--out", current,
                          "--quiet"), "is the input --current")
    assert snapshot(pairs) == before


def test_predict_refuses_a_link_or_hard_link_to_an_input(model, pairs, tmp_path):
    past, current = pairs / "A" / "t1.png", pairs / "B" / "t1.png"
    before = snapshot(pairs)
    (tmp_path / "link.png").symlink_to(past)
    os.link(current, tmp_path / "hard.png")
    for out, needle in ((tmp_path / "link.png", "--past"), (tmp_path / "hard.png", "--current")):
        one_line_error(invoke("predict", "--model", model, "--past", past, "--current", current, "--out", out,
                              "--quiet"), needle)
    assert snapshot(pairs) == before


def test_predict_pair_folder_refuses_an_output_folder_that_is_or_holds_an_input(model, pairs):
    before = snapshot(pairs)
    one_line_error(invoke("predict", "--model", model, "--pairs", pairs, "--out", pairs / "A", "--quiet"),
                   f"--out {pairs / 'A'}", "--pairs")
    one_line_error(invoke("predict", "--model", model, "--pairs", pairs, "--out", pairs, "--quiet"), "--pairs")
    one_line_error(invoke("predict", "--model", model, "--pairs", pairs, "--out", model.parent, "--quiet"),
                   "--model")
    assert snapshot(pairs) == before
    # a folder beside the images is fine
    result = invoke("predict", "--model", model, "--pairs", pairs, "--out", pairs / "masks", "--quiet")
    assert result.exit_code == 0, result.output
    assert (pairs / "masks" / "t1.png").is_file()


def test_export_refuses_to_write_over_its_checkpoint(model, tmp_path):
    checkpoint = tmp_path / "weights.onnx"          # a checkpoint under an odd name: --onnx would replace it
    checkpoint.write_bytes(model.read_bytes())
    before = snapshot(tmp_path)
    one_line_error(invoke("export", "--model", checkpoint, "--out", checkpoint), "is the input --model")
    one_line_error(invoke("export", "--model", checkpoint, "--out", tmp_path / "weights.safetensors", "--onnx"),
                   "weights.onnx", "is the input --model")
    odd = tmp_path / "best.safetensors"             # the default output is the checkpoint's own name
    odd.write_bytes(model.read_bytes())
    before = snapshot(tmp_path)
    one_line_error(invoke("export", "--model", odd), "is the input --model")
    assert snapshot(tmp_path) == before


def test_training_commands_refuse_an_output_folder_that_holds_their_packs(packs, model):
    before = snapshot(packs)
    one_line_error(invoke("train-local", "--data", packs, "--all", "--out", packs, *TINY), "--data")
    one_line_error(invoke("train-local", "--data", packs / "Jung-gu.h5", "--out", packs / "Jung-gu.h5", *TINY),
                   "is the input --data")
    one_line_error(invoke("train-central", "--data", packs, "--out", packs, *TINY), "--data")
    one_line_error(invoke("personalise", "--model", model, "--data", packs, "--out", model.parent, *TRAIN),
                   "--model")
    one_line_error(invoke("federate", "--data", packs, "--out", packs, "--rounds", "1", "--width", "2", "--quiet"),
                   "--data")
    assert snapshot(packs) == before


def test_pack_refuses_its_source_folder_as_output(tmp_path):
    source = tmp_path / "src"
    (source / "A").mkdir(parents=True)
    (source / "A" / "x.png").write_bytes(b"")
    before = snapshot(tmp_path)
    one_line_error(invoke("pack", source, "--out", source), "is the input SRC")
    one_line_error(invoke("pack", source, "--out", tmp_path), "SRC")
    assert snapshot(tmp_path) == before


def test_report_refuses_to_write_into_a_results_folder_it_reads(tmp_path):
    run = make_run(tmp_path / "run", [{"name": "Jung-gu", "samples": 10, "local": 0.4, "federated": 0.5,
                                       "personalised": 0.55, "centralised": 0.6}])
    before = snapshot(run)
    one_line_error(invoke("report", "--run", run, "--out", run / "central", "--no-figures"), "--run")
    one_line_error(invoke("report", "--run", run, "--out", run, "--no-figures"), "--run")
    one_line_error(invoke("report", "--local", run / "local", "--federated", run / "federated" / "federated.csv",
                          "--out", run / "federated", "--no-figures"), "--federated")
    assert snapshot(run) == before
    result = invoke("report", "--run", run, "--out", run / "report", "--no-figures")   # the demo's own layout
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ 5. duplicate districts

@pytest.mark.parametrize("command", ["federate", "train-local", "train-central", "personalise", "evaluate"])
def test_two_packs_of_one_district_are_refused_naming_both(command, twin_packs, model, tmp_path):
    out = tmp_path / "out"
    args = {"federate": ["federate", "--data", twin_packs, "--out", out, "--rounds", "1", "--width", "2", "--quiet",
                         "--no-round-eval"],
            "train-local": ["train-local", "--data", twin_packs, "--all", "--out", out, *TINY],
            "train-central": ["train-central", "--data", twin_packs, "--out", out, *TINY],
            "personalise": ["personalise", "--model", model, "--data", twin_packs, "--out", out, *TRAIN],
            "evaluate": ["evaluate", "--model", model, "--data", twin_packs]}[command]
    one_line_error(invoke(*args), f"{twin_packs / 'a.h5'} and {twin_packs / 'b.h5'} both hold district 'Jung-gu'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 6. links in run folders

def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    return secret


def test_a_symlinked_lock_is_refused_without_truncating_or_printing_its_target(packs, tmp_path):
    secret = _secret(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".nfed.lock").symlink_to(secret)
    result = invoke("federate", "--data", packs, "--out", run, "--rounds", "1", "--width", "2", "--quiet",
                    "--no-round-eval")
    one_line_error(result, f"{run / '.nfed.lock'} is a symbolic link: refusing to follow it")
    assert "not nfed's" not in result.output
    assert secret.read_text() == SECRET and sorted(p.name for p in run.iterdir()) == [".nfed.lock"]


def test_a_hard_linked_or_special_lock_is_refused(packs, tmp_path):
    from nfed.common.errors import NfedError
    from nfed.runs.runlock import RunLock

    secret = _secret(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    os.link(secret, run / ".nfed.lock")
    with pytest.raises(NfedError, match="not a regular file of its own"):
        with RunLock(run):
            pass
    assert secret.read_text() == SECRET
    (run / ".nfed.lock").unlink()
    os.mkfifo(run / ".nfed.lock")
    with pytest.raises(NfedError, match="not a regular file"):
        with RunLock(run):
            pass


def test_status_never_blocks_on_or_follows_a_planted_lock(tmp_path):
    """`nfed status` tests the lock read-only: a FIFO there must not hang it, a link must not be followed."""
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".nfed.lock")
    code = f"from nfed.runs.runlock import lock_holder; print(lock_holder({str(run)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_state_files_read_back_are_not_followed_through_links(tmp_path):
    from nfed.common.errors import NfedError
    from nfed.runs.runfolder import read_rounds
    from nfed.runs.runstatus import write_status

    other = tmp_path / "other"
    other.mkdir()
    write_status(other, "finished", round_number=7, rounds=7)
    (other / "rounds.jsonl").write_text('{"round": 1}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").symlink_to(other / "status.json")
    one_line_error(invoke("status", run), "status.json is a symbolic link")
    (run / "rounds.jsonl").symlink_to(other / "rounds.jsonl")
    with pytest.raises(NfedError, match="rounds.jsonl is a symbolic link"):
        read_rounds(run / "rounds.jsonl")


def test_a_log_appended_in_place_is_not_followed_through_a_link(tmp_path):
    """LineLog (epochs.jsonl) appends in place: a link planted at its name must not append to its target."""
    from nfed.common.atomic import LineLog
    from nfed.common.errors import NfedError

    secret = _secret(tmp_path)
    (tmp_path / "epochs.jsonl").symlink_to(secret)
    with pytest.raises(NfedError, match="epochs.jsonl is a symbolic link"):
        LineLog(tmp_path / "epochs.jsonl").write("{}\n")
    assert secret.read_text() == SECRET
    log = LineLog(tmp_path / "own.jsonl")          # a fresh log, and one appended to, still work
    log.write("1\n")
    log.close()
    log = LineLog(tmp_path / "own.jsonl")
    log.write("2\n")
    log.close()
    assert (tmp_path / "own.jsonl").read_text() == "1\n2\n"


def test_a_run_folder_whose_client_state_is_a_link_is_refused(packs, tmp_path):
    """--client-state keep writes RUN/client_state/: a link there would put the files outside the run folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "client_state").symlink_to(elsewhere, target_is_directory=True)
    one_line_error(invoke("federate", "--data", packs, "--out", run, "--rounds", "1", "--width", "2", "--quiet",
                          "--no-round-eval", "--client-state", "keep"), "client_state is a symbolic link")
    assert list(elsewhere.iterdir()) == []
