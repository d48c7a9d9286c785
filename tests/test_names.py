"""Issue 25, item 2: a name read from a file (a pack's district, a label, a Flower message) is data. One rule
(nfed.common.names) decides whether it may name a file or folder; a hostile one is refused in one line before
anything is written, and nothing nfed prints lets a string from a file send escape sequences to the terminal."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
from test_hardening import invoke, one_line_error
from test_training import synthetic_pack

from nfed.common.errors import DataError

TINY = ["--width", "2", "--batch-size", "4", "--epochs", "1", "--quiet"]
HOSTILE = ["../../X", "{abs}", "..", "a\x1b[2Jb", "a\x9b2Jb"]


def terminal_safe(text: str) -> bool:
    """No byte a terminal acts on: no C0 control but newline, no DEL, no C1 control (0x9b is a one-byte CSI)."""
    return not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in text)


def tiny_pack(path: Path, **attrs) -> Path:
    """A tiny synthetic pack whose attributes are then overwritten as a hostile file would have them."""
    synthetic_pack(path, "Jung-gu", counts=(4, 2, 2), tile=32, seed=3)
    with h5py.File(path, "a") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value
    return path


def files_outside(root: Path, out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and out not in p.parents}


@pytest.fixture(scope="module")
def global_model(tmp_path_factory) -> Path:
    """A tiny trained checkpoint for `nfed personalise` to start from."""
    root = tmp_path_factory.mktemp("model")
    synthetic_pack(root / "Jung-gu.h5", "Jung-gu", counts=(4, 2, 2), tile=32, seed=1)
    result = invoke("train-local", "--data", root / "Jung-gu.h5", "--out", root / "run", *TINY)
    assert result.exit_code == 0, result.output
    return root / "run" / "Jung-gu" / "best.h5"


def _command(kind: str, data: Path, out: Path, model: Path) -> list:
    if kind == "train-local":
        return ["train-local", "--data", data / "evil.h5", "--out", out, *TINY]
    if kind == "personalise":
        return ["personalise", "--model", model, "--data", data, "--out", out, "--epochs", "1", "--quiet"]
    return ["federate", "--data", data, "--out", out, "--rounds", "1", "--client-state", "keep", "--width", "2",
            "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize("kind", ["train-local", "personalise", "federate"])
@pytest.mark.parametrize("name", HOSTILE, ids=["up-up", "absolute", "dot-dot", "esc", "csi"])
def test_a_hostile_district_attribute_is_refused_before_anything_is_written(kind, name, tmp_path, global_model):
    name = name.format(abs=tmp_path / "abs")
    data, out = tmp_path / "data", tmp_path / "a" / "b" / "out"
    data.mkdir()
    tiny_pack(data / "evil.h5", district=name)
    if kind == "federate":
        synthetic_pack(data / "Nowon-gu.h5", "Nowon-gu", counts=(4, 2, 2), tile=32, seed=2)
    precious = tmp_path / "a" / "X"   # where '../../X' would land
    precious.mkdir(parents=True)
    (precious / "best.h5").write_bytes(b"not yours")
    before = files_outside(tmp_path, out)
    result = invoke(*_command(kind, data, out, global_model))
    error = one_line_error(result, "evil.h5", "district name", "cannot be a file or folder name")
    assert terminal_safe(result.output), repr(result.output)
    assert files_outside(tmp_path, out) == before
    assert not (tmp_path / "abs").exists()
    if not name.startswith(("/", ".")):
        assert repr(name)[1:-1] in error   # shown escaped, so the operator sees what the file holds


def test_info_prints_no_escape_sequence_from_a_packs_attributes(tmp_path):
    hostile = "json:\x1b]0;owned\x07src\x1b[2J\x9b31m"
    path = tiny_pack(tmp_path / "p.h5", source=hostile, nfed_version="1\x1b[A", split_seed="7\r\x1b[K",
                     mask_values="0=none,1=new\x1b[5m,2=b,3=c,4=d")
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert terminal_safe(result.output), repr(result.output)
    assert "district Jung-gu" in result.output and "\\x1b]0;owned\\x07src" in result.output
    result = invoke("info", path, "--json")
    assert result.exit_code == 0 and terminal_safe(result.output), repr(result.output)
    summary = json.loads(result.output)
    assert summary["source"] == hostile and summary["split_seed"] == "7\r\x1b[K"   # escaped, not lost


def test_info_on_a_pack_with_a_hostile_district_is_one_safe_line(tmp_path):
    path = tiny_pack(tmp_path / "p.h5", district="Jung-gu\x1b[2J\u202e")
    result = invoke("info", path)
    error = one_line_error(result, "p.h5", "district name", "Jung-gu\\x1b[2J\\u202e")
    assert terminal_safe(result.output) and "\u202e" not in error


def test_the_cli_error_line_escapes_whatever_the_message_holds(monkeypatch):
    def hostile(*args, **kwargs):
        raise DataError("bad\x1b[2J\nsecond line\x9b")

    monkeypatch.setattr("nfed.data.reader.DistrictPack", hostile)
    result = invoke("info", "x.h5")
    error = one_line_error(result, "bad\\x1b[2J\\nsecond line\\x9b")
    assert terminal_safe(result.output) and error == result.output.strip()


def test_the_flower_server_output_escapes_what_nodes_send(capsys):
    pytest.importorskip("flwr")
    from nfed.federation.flower.app import _echo

    _echo("SuperNode 7 failed: \x1b]0;owned\x07\x9b2J")
    out = capsys.readouterr().out
    assert terminal_safe(out) and "failed: \\x1b]0;owned\\x07\\x9b2J" in out


# ------------------------------------------------------------------------------------------ the one rule

def test_one_rule_for_every_name():
    from nfed.common.names import MAX_NAME, check_name, safe_name
    from nfed.federation import roster

    good = ["Jung-gu", "강남구", "San Francisco", "a" * MAX_NAME, "x.y", "Gangnam-gu_2"]
    bad = ["", ".", "..", ".hidden", "a/b", "a\\b", "a,b", " Jung-gu", "Jung-gu ", "a\x00b", "a\x1bb", "a\x9bb",
           "a\tb", "a\u202eb", "a" * (MAX_NAME + 1), None, 5, b"Jung-gu", ["Jung-gu"]]
    assert all(safe_name(n) and roster.valid_district_name(n) for n in good)
    assert not any(safe_name(n) or roster.valid_district_name(n) for n in bad)
    assert check_name("강남구", "x.h5") == "강남구"
    with pytest.raises(DataError) as caught:
        check_name("a\x1b[2J\nb", "x.h5")
    message = str(caught.value)
    assert message.startswith("x.h5: district name ") and terminal_safe(message) and "\n" not in message
    with pytest.raises(DataError, match="tile id"):
        check_name("..", "y.json", what="tile id")


def test_ingest_and_flower_use_the_same_rule(tmp_path):
    from nfed.data import pack
    from nfed.federation.flower.messages import check_description

    assert not hasattr(pack, "_SAFE_NAME")
    claim = {"tile": 32, "samples": {"train": 1, "val": 1, "test": 1}}
    for name in ("a\\b", "a\x9bb", "x" * 101):
        with pytest.raises(DataError, match="not a valid name"):
            check_description({**claim, "district": name})
    assert check_description({**claim, "district": "강남구"})["district"] == "강남구"


def test_paths_from_names_stay_in_their_folder(tmp_path):
    from nfed.common.names import child_path
    from nfed.runs.runfolder import state_file

    assert child_path(tmp_path, "Jung-gu") == tmp_path / "Jung-gu"
    assert state_file(tmp_path, "Jung-gu", 3) == tmp_path / "client_state" / "Jung-gu.r0003.h5"
    for name in ("../x", "..", str(tmp_path / "abs"), "a\x1bb"):
        with pytest.raises(DataError, match="cannot be a file or folder name"):
            child_path(tmp_path, name)
        with pytest.raises(DataError, match="cannot be a file or folder name"):
            state_file(tmp_path, name, 1)
