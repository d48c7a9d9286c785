"""Packing LEVIR-CD folders: the real sample tiles, cutting, RGBA, district sub-folders and maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from nfed.cli import cli
from nfed.data import pack
from nfed.data.reader import DistrictPack

LABELLED = 11


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def all_ids(path: Path) -> list[str]:
    with DistrictPack(path) as p:
        return sorted(sum((p.ids(s) for s in ("train", "val", "test")), []))


def test_real_samples_reject_the_broken_pair_by_name(levir_dir, tmp_path):
    code, output = run("pack", levir_dir, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1
    assert "levir-cd-samples/A/test_113_0256.png: pair 'test_113_0256' is missing label/test_113_0256.*" in error[0]
    assert "sizes differ (past 768x384, current 768x383)" in error[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_real_samples_pack_around_the_broken_pair(levir_dir, tmp_path):
    code, output = run("pack", levir_dir, "--out", tmp_path / "out", "--skip-bad", "--quiet")
    assert code == 0, output
    assert "skipped 1 item(s):" in output and "skipped: levir-cd-samples/A/test_113_0256.png" in output
    path = tmp_path / "out" / "levir-cd-samples.h5"
    stems = sorted(p.stem for p in (levir_dir / "label").glob("*.png"))
    assert len(stems) == LABELLED and all_ids(path) == stems
    with DistrictPack(path) as p:
        assert p.tile == 256 and p.attrs["mask_values"] == "0=none,1=change"
        assert [p.num_samples(s) for s in ("train", "val", "test")] == [7, 2, 2]
        for split in ("train", "val", "test"):
            for batch in p.batches(split, 4, shuffle=False):
                for k, tile_id in enumerate(batch.ids):
                    label = np.asarray(Image.open(levir_dir / "label" / f"{tile_id}.png").convert("L"))
                    np.testing.assert_array_equal(batch.mask[k], (label >= 128).astype(np.int64))
                    past = np.asarray(Image.open(levir_dir / "A" / f"{tile_id}.png").convert("RGB"))
                    np.testing.assert_allclose(batch.past[k].transpose(1, 2, 0) * 255, past, atol=1e-3)
                    if tile_id == "train_386_0512_0768":
                        assert batch.mask[k].sum() == 0  # all-zero label: a tile without change is fine
    code, output = run("info", path)
    assert code == 0 and "tiles: train 7, val 2, test 2 (total 11)" in output and "change " in output


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def levir_pair(root: Path, stem: str, width: int, height: int, seed: int = 0, rgba: bool = False) -> None:
    rng = np.random.default_rng(seed)
    channels = 4 if rgba else 3
    save(root / "A" / f"{stem}.png", rng.integers(0, 256, (height, width, channels), dtype=np.uint8))
    save(root / "B" / f"{stem}.png", rng.integers(0, 256, (height, width, channels), dtype=np.uint8))
    label = np.zeros((height, width), np.uint8)
    label[: height // 2, : width // 3] = 255
    label[-1, -1] = 127  # below the 128 threshold: no change
    save(root / "label" / f"{stem}.png", label)


def test_large_rgba_images_are_cut_and_converted(tmp_path):
    src = tmp_path / "city"
    levir_pair(src, "big", 80, 70, rgba=True)  # tile 32: 2 rows x 2 cols, remainders dropped
    levir_pair(src, "small", 20, 24, seed=1)   # smaller than a tile: zero-padded
    levir_pair(src, "exact", 32, 32, seed=2)
    report = pack.pack_folder(src, tmp_path / "out", tile=32)
    assert report.written == {"city": tmp_path / "out" / "city.h5"}
    assert all_ids(tmp_path / "out" / "city.h5") == sorted(
        ["big_y0000_x0000", "big_y0000_x0032", "big_y0032_x0000", "big_y0032_x0032", "small_y0000_x0000",
         "exact"])
    with DistrictPack(tmp_path / "out" / "city.h5") as p:
        for split in ("train", "val", "test"):
            if not p.num_samples(split):
                continue
            past, _, mask, ids = p.read(split, range(p.num_samples(split)))
            for k, tile_id in enumerate(ids):
                if tile_id == "big_y0032_x0032":
                    source = np.asarray(Image.open(src / "A" / "big.png"))[32:64, 32:64, :3]
                    np.testing.assert_array_equal(past[k], source)
                    assert mask[k].sum() == 0
                if tile_id == "big_y0000_x0000":
                    assert mask[k][:32, :26].all() and not mask[k][:, 27:].any()
                if tile_id == "small_y0000_x0000":
                    assert not past[k][24:].any() and not past[k][:, 20:].any() and mask[k][:12, :6].all()


def test_district_subfolders_and_district_map(tmp_path):
    src = tmp_path / "levir"
    for i in range(3):
        levir_pair(src / "Jung-gu", f"j{i}", 32, 32, seed=i)
    levir_pair(src / "Mapo-gu", "m0", 32, 32, seed=9)
    report = pack.pack_folder(src, tmp_path / "out")
    assert sorted(report.written) == ["Jung-gu", "Mapo-gu"]
    assert report.counts["Jung-gu"] == {"train": 1, "val": 1, "test": 1}
    mapping = tmp_path / "map.csv"
    mapping.write_text("stem,district\nj0,Gangnam-gu\nj1,Gangnam-gu\nj2,Jongno-gu\nm0,Jongno-gu\n")
    code, output = run("pack", src, "--out", tmp_path / "mapped", "--district-map", mapping, "--quiet",
                       "--tile", "32")
    assert code == 0, output
    assert all_ids(tmp_path / "mapped" / "Gangnam-gu.h5") == ["j0", "j1"]
    assert all_ids(tmp_path / "mapped" / "Jongno-gu.h5") == ["j2", "m0"]
    mapping.write_text("j0,Gangnam-gu\n")
    code, output = run("pack", src, "--out", tmp_path / "partial", "--district-map", mapping, "--quiet")
    assert code == 1 and "stem 'j1' is not in the district map" in output


def test_levir_bad_inputs(tmp_path):
    src = tmp_path / "levir"
    for i in range(3):
        levir_pair(src, f"p{i}", 32, 32, seed=i)
    (src / "B" / "p1.png").unlink()
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "levir/A/p1.png: pair 'p1' is missing B/p1.*" in output
    levir_pair(src, "p1", 32, 32)
    save(src / "label" / "p2.png", np.zeros((31, 32), np.uint8))
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "levir/A/p2.png: sizes differ (past 32x32, current 32x32, label 32x31)" in output
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad", "--tile", "32")
    assert code == 0 and all_ids(tmp_path / "out" / "levir.h5") == ["p0", "p1"]
    assert "skipped: levir/A/p2.png: sizes differ" in output
    (tmp_path / "emptydistrict" / "Jung-gu" / "A").mkdir(parents=True)
    (tmp_path / "emptydistrict" / "Jung-gu" / "B").mkdir(parents=True)
    code, output = run("pack", tmp_path / "emptydistrict", "--out", tmp_path / "out2", "--quiet")
    assert code == 1 and "emptydistrict/Jung-gu: empty district (no images in A/, B/, label/)" in output
