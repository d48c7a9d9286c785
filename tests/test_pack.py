"""`nfed pack` of JSON-labelled folders and `nfed info`: format, splits, atomicity and bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nfed.cli import cli
from nfed.common.errors import ConfigError
from nfed.data import labels, pack
from nfed.data.packwriter import write_pack
from nfed.data.reader import DistrictPack


def write_pair(folder: Path, tile_id: str, district: str = "Jung-gu", size=(32, 32), changes=None,
               current_size=None, seed=0) -> Path:
    """One JSON-labelled pair in `folder`; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    cw, ch = current_size or size
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{tile_id}_a.png")
    Image.fromarray(rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)).save(folder / f"{tile_id}_b.png")
    if changes is None:
        changes = [("new", [(1, 1), (10, 1), (10, 8), (1, 8)]), ("recoloured", [(20, 20), (30, 20), (25, 30)])]
    doc = labels.label_document(tile_id, district, f"{tile_id}_a.png", f"{tile_id}_b.png", width, height, changes)
    path = folder / f"{tile_id}.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def make_source(root: Path, per_district: dict[str, int]) -> Path:
    for district, count in per_district.items():
        for i in range(count):
            write_pair(root / district, f"{district}_{i:03d}", district, seed=i)
    return root


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str):
    assert code == 1, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, output
    for fragment in fragments:
        assert fragment in error_lines[0], output


def test_pack_json_folder_writes_one_pack_per_district(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 10, "Gangnam-gu": 4})
    code, output = run("pack", src, "--out", tmp_path / "packs", "--quiet")
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "packs").iterdir()) == ["Gangnam-gu.h5", "Jung-gu.h5"]
    with h5py.File(tmp_path / "packs" / "Jung-gu.h5", "r") as f:
        assert f.attrs["district"] == "Jung-gu" and f.attrs["tile_size"] == 32
        assert f.attrs["format_version"] == 1 and f.attrs["split_seed"] == 0
        assert f.attrs["source"] == "json:src" and f.attrs["nfed_version"]
        counts = [f[s]["past"].shape[0] for s in ("train", "val", "test")]
        assert counts == [6, 2, 2] and sum(counts) == 10
        train = f["train"]
        assert train["past"].dtype == np.uint8 and train["past"].shape[1:] == (32, 32, 3)
        assert train["mask"].shape[1:] == (32, 32) and train["past"].chunks == (1, 32, 32, 3)
        assert train["past"].compression == "gzip" and train["mask"].compression == "gzip"
        ids = [i.decode() for i in train["ids"][:]]
        # pixels and mask are exactly the source image and the rasterised label
        tile_id = ids[0]
        label = labels.read_label(src / "Jung-gu" / f"{tile_id}.json")
        np.testing.assert_array_equal(train["past"][0], np.asarray(Image.open(label.past)))
        np.testing.assert_array_equal(train["current"][0], np.asarray(Image.open(label.current)))
        np.testing.assert_array_equal(train["mask"][0], labels.rasterise(label))
        assert set(np.unique(train["mask"][0])) == {0, 1, 4}


def test_packs_may_be_written_inside_the_source_folder(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    for _ in range(2):  # the second run must not take the pack folder for an empty district
        code, output = run("pack", src, "--out", src / "packs", "--quiet")
        assert code == 0, output
    assert [p.name for p in (src / "packs").iterdir()] == ["Jung-gu.h5"]


def test_split_is_deterministic_and_never_empty(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    splits = []
    for seed, name in ((5, "a"), (5, "b"), (6, "c")):
        pack.pack_folder(src, tmp_path / name, seed=seed)
        with DistrictPack(tmp_path / name / "Jung-gu.h5") as p:
            assert [p.num_samples(s) for s in ("train", "val", "test")] == [1, 1, 1]
            splits.append([p.ids(s) for s in ("train", "val", "test")])
    assert splits[0] == splits[1]
    for n in range(3, 60):
        counts = pack.split_counts(n, (0.7, 0.15, 0.15))
        assert sum(counts) == n and min(counts) >= 1
    assert pack.split_counts(2, (0.7, 0.15, 0.15))[0] >= 1
    assert pack.split_counts(10, (0.8, 0.2, 0.0)) == (8, 2, 0)
    with pytest.raises(ConfigError, match="--split"):
        pack.parse_split("0.5,0.2")


def test_json_tiles_are_cut_with_tile_option(tmp_path):
    write_pair(tmp_path / "src", "big", size=(70, 40), changes=[("new", [(0, 0), (70, 0), (70, 40), (0, 40)])])
    report = pack.pack_folder(tmp_path / "src", tmp_path / "out", tile=32)
    assert report.counts["Jung-gu"] == {"train": 2, "val": 0, "test": 0}  # 2 full tiles, remainder dropped
    with DistrictPack(tmp_path / "out" / "Jung-gu.h5") as p:
        assert sorted(p.ids("train")) == ["big_y0000_x0000", "big_y0000_x0032"]
    code, output = run("pack", tmp_path / "src", "--out", tmp_path / "out2", "--quiet")
    assert_one_line_error(code, output, "src/big.json: tile is 70x40, not square (use --tile")


def test_images_smaller_than_the_tile_are_padded_and_counted(tmp_path):
    make_source(tmp_path / "src", {"Jung-gu": 3})   # 32 px pairs
    write_pair(tmp_path / "src" / "Jung-gu", "wide", size=(70, 40))
    report = pack.pack_folder(tmp_path / "src", tmp_path / "out", tile=64)
    assert report.padded == 4 and sum(report.counts["Jung-gu"].values()) == 4
    assert pack.pack_folder(tmp_path / "src", tmp_path / "out16", tile=16).padded == 0
    code, output = run("pack", tmp_path / "src", "--out", tmp_path / "o2", "--tile", 64, "--quiet")
    assert code == 0 and "warning: 4 image(s) smaller than the tile were zero-padded" in output, output
    code, output = run("pack", tmp_path / "src", "--out", tmp_path / "o3", "--tile", 16, "--quiet")
    assert code == 0 and "warning" not in output, output


def test_missing_image(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    (src / "Jung-gu" / "Jung-gu_001_b.png").unlink()
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "src/Jung-gu/Jung-gu_001_b.png: file not found")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_size_mismatch_between_past_current_and_label(tmp_path):
    src = tmp_path / "src"
    make_source(src, {"Jung-gu": 3})
    write_pair(src / "Jung-gu", "odd", current_size=(32, 31))
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "src/Jung-gu/odd.json: sizes differ (past 32x32, current 32x31, label 32x32)")
    path = write_pair(src / "Jung-gu", "odd", size=(32, 32))
    doc = json.loads(path.read_text())
    doc["size"] = {"width": 30, "height": 32}
    path.write_text(json.dumps(doc))
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "odd.json: sizes differ (past 32x32, current 32x32, label 30x32)")


def test_unreadable_png(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    (src / "Jung-gu" / "Jung-gu_002_a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "src/Jung-gu/Jung-gu_002_a.png: unreadable image")
    # a PNG whose header is fine but whose pixel data is cut off fails at decoding, also by name
    good = src / "Jung-gu" / "Jung-gu_001_a.png"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    (src / "Jung-gu" / "Jung-gu_002_a.png").unlink()
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad")
    assert code == 0, output
    assert "skipped: src/Jung-gu/Jung-gu_001_a.png: unreadable image" in output
    with DistrictPack(tmp_path / "out" / "Jung-gu.h5") as p:
        assert sorted(sum((p.ids(s) for s in ("train", "val", "test")), [])) == ["Jung-gu_000"]


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["changes"][0].update(type="built"),
     "changes[0].type: 'built' is not one of new, demolished, renewed, recoloured"),
    (lambda d: d["changes"][1]["polygon"].append([33, 5]),
     "changes[1].polygon[3]: point (33, 5) lies outside the 32x32 tile"),
    (lambda d: d["changes"][0]["polygon"].__setitem__(0, ["x", 1]),
     "changes[0].polygon[0][0]: 'x' is not of type number"),
])
def test_json_failing_the_schema(tmp_path, edit, fragment):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    path = src / "Jung-gu" / "Jung-gu_001.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, f"src/Jung-gu/Jung-gu_001.json: {fragment}")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad")
    assert code == 0, output
    assert f"skipped: src/Jung-gu/Jung-gu_001.json: {fragment}" in output
    with DistrictPack(tmp_path / "out" / "Jung-gu.h5") as p:
        assert sum(p.num_samples(s) for s in ("train", "val", "test")) == 2


def test_duplicate_ids(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    write_pair(src / "Jung-gu" / "again", "Jung-gu_001")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "duplicate tile id 'Jung-gu_001' in Jung-gu")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad")
    assert code == 0 and "skipped: src/Jung-gu/again/Jung-gu_001.json: duplicate tile id" in output


def test_empty_district(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    (src / "Nowon-gu").mkdir()
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "src/Nowon-gu: empty district (no *.json labels)")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad")
    assert code == 0 and "skipped: src/Nowon-gu: empty district" in output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Jung-gu.h5"]
    # a district whose every pair is bad is listed as empty, and no pack appears for it
    for path in (src / "Jung-gu").glob("*_b.png"):
        path.write_bytes(b"not a png")
    code, output = run("pack", src, "--out", tmp_path / "out3", "--quiet", "--skip-bad")
    assert_one_line_error(code, output, "nothing to pack")


def test_missing_source_and_no_labels(tmp_path):
    code, output = run("pack", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_one_line_error(code, output, "nowhere: source folder not found")
    (tmp_path / "empty").mkdir()
    code, output = run("pack", tmp_path / "empty", "--out", tmp_path / "out")
    assert_one_line_error(code, output, "empty: neither a LEVIR-CD folder")


def test_interrupted_pack_leaves_no_valid_looking_file(tmp_path, monkeypatch):
    src = make_source(tmp_path / "src", {"Jung-gu": 4})
    calls = []
    real_load = pack.load_item

    def interrupted(item, root):
        calls.append(item)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(item, root)

    monkeypatch.setattr(pack, "load_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack.pack_folder(src, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # neither Jung-gu.h5 nor a leftover temp file


def test_info_reports_counts_share_and_types(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 5})
    pack.pack_folder(src, tmp_path / "out")
    code, output = run("info", tmp_path / "out" / "Jung-gu.h5")
    assert code == 0, output
    assert "district Jung-gu, tile 32, source json:src" in output
    assert "tiles: train 3, val 1, test 1 (total 5)" in output
    assert "new 400 px in 5 tiles" in output and "recoloured 305 px in 5 tiles" in output
    code, output = run("info", tmp_path / "out" / "Jung-gu.h5", "--json")
    summary = json.loads(output)
    assert summary["tiles"] == 5 and summary["splits"]["train"]["tiles"] == 3
    mask = labels.rasterise(labels.read_label(src / "Jung-gu" / "Jung-gu_000.json"))
    assert summary["change_pixel_share"] == pytest.approx(np.count_nonzero(mask) / mask.size)
    assert summary["change_types"]["new"] == {"pixels": 5 * 80, "tiles": 5}
    assert summary["change_types"]["demolished"] == {"pixels": 0, "tiles": 0}


def test_info_on_truncated_and_missing_packs(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 5})
    pack.pack_folder(src, tmp_path / "out")
    path = tmp_path / "out" / "Jung-gu.h5"
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    code, output = run("info", truncated)
    assert_one_line_error(code, output, "truncated.h5: not a readable HDF5 pack (truncated or corrupt")
    code, output = run("info", tmp_path / "none.h5")
    assert_one_line_error(code, output, "none.h5: pack not found")
    (tmp_path / "text.h5").write_text("hello")
    code, output = run("info", tmp_path / "text.h5")
    assert_one_line_error(code, output, "text.h5: not a readable HDF5 pack")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    code, output = run("info", tmp_path / "other.h5")
    assert_one_line_error(code, output, "other.h5: not an nfed pack (missing attribute(s) district")


def test_write_pack_from_arrays_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    past = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (3, 16, 16), dtype=np.uint8)
    write_pack(tmp_path / "x.h5", "Mapo-gu", {"train": (past, past, mask, ["a", "b", "c"])})
    with DistrictPack(tmp_path / "x.h5") as p:
        assert p.district == "Mapo-gu" and p.tile == 16 and p.num_samples("val") == 0
        raw_past, _, raw_mask, ids = p.read("train", [2, 0])
        np.testing.assert_array_equal(raw_past, past[[2, 0]])
        np.testing.assert_array_equal(raw_mask, mask[[2, 0]])
        assert ids == ["c", "a"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
