"""`nfed synth`: layout, determinism, counts, district styles, and that differencing cannot solve it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nfed.cli import cli
from nfed.data import labels, synth
from nfed.data.districts import find_district, load_districts
from nfed.data.pack import pack_folder
from nfed.data.reader import DistrictPack
from nfed.data.synthscene import generate_tile
from nfed.data.synthstyle import district_style


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_labels(tmp_path):
    code, output = run("synth", "--out", tmp_path / "s", "--districts", "Jung-gu,Nowon-gu", "--scale", "0.01",
                       "--min-per-district", "5", "--tile", "48", "--val-tiles", "0", "--test-tiles", "0",
                       "--quiet")
    assert code == 0, output
    assert "wrote 10 tiles (48x48) for 2 district(s)" in output
    folder = tmp_path / "s" / "Jung-gu"
    assert sorted(p.name for p in folder.iterdir())[:3] == ["Jung-gu_00000.json", "Jung-gu_00000_current.png",
                                                             "Jung-gu_00000_past.png"]
    assert len(list(folder.glob("*.json"))) == 5
    manifest = (tmp_path / "s" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "district,tiles,change_pixel_share,train,val,test" and manifest[1].startswith("Jung-gu,5,")
    for path in (tmp_path / "s").rglob("*.json"):
        label = labels.read_label(path)  # validates against the schema
        assert label.district == path.parent.name and (label.width, label.height) == (48, 48)
        for image in (label.past, label.current):
            with Image.open(image) as im:
                assert im.size == (48, 48) and im.mode == "RGB"
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_same_seed_gives_identical_bytes(tmp_path):
    options = dict(scale=0.001, tile=32, districts="Jongno-gu,Mapo-gu", min_per_district=3)
    synth.synthesise(tmp_path / "a", seed=7, **options)
    synth.synthesise(tmp_path / "b", seed=7, **options)
    synth.synthesise(tmp_path / "c", seed=8, **options)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 2 * 3 * 3 + 1
    assert a.keys() == c.keys() and a != c
    assert a["Mapo-gu/Mapo-gu_00002_past.png"] != c["Mapo-gu/Mapo-gu_00002_past.png"]


def test_counts_follow_the_study():
    districts = load_districts()
    assert synth.tile_count(find_district("Gangseo-gu"), 0.025, 8) == 107
    assert synth.tile_count(find_district("Nowon-gu"), 0.025, 8) == 8  # round(3.5) = 4 < 8
    assert sum(synth.tile_count(d, 1.0, 8) for d in districts) == 40750
    assert [d.name for d in synth.select_districts("all")] == [d.name for d in districts]
    assert [d.name for d in synth.select_districts("mapo, Jung-gu")] == ["Mapo-gu", "Jung-gu"]


def generated(per_district: int, tile: int = 64, seed: int = 0):
    out = {}
    for district in load_districts():
        style = district_style(district.name, seed)
        out[district.name] = [generate_tile(style, synth.tile_rng(seed, district.name, i), tile)
                              for i in range(per_district)]
    return out


@pytest.fixture(scope="module")
def sample_tiles():
    return generated(12)


def test_change_share_and_types(sample_tiles):
    masks = np.stack([t.mask() for tiles in sample_tiles.values() for t in tiles])
    share = np.count_nonzero(masks) / masks.size
    assert 0.05 <= share <= 0.25, share
    counts = np.bincount(masks.ravel(), minlength=5)
    assert (counts[1:] > 0.1 * counts[1:].sum()).all(), counts  # all four change types are common
    per_district = [np.mean([np.count_nonzero(t.mask()) / t.mask().size for t in tiles])
                    for tiles in sample_tiles.values()]
    assert min(per_district) > 0.02 and max(per_district) < 0.3
    # the labelled polygons and the generator agree: every polygon lies inside the tile
    for tiles in sample_tiles.values():
        for t in tiles:
            for kind, polygon in t.changes:
                assert kind in labels.CHANGE_TYPES
                assert all(0 <= x <= 64 and 0 <= y <= 64 for x, y in polygon)


def test_districts_look_different_but_are_reproducible(sample_tiles):
    assert district_style("Mapo-gu", 0).palette.tolist() == district_style("Mapo-gu", 0).palette.tolist()
    assert district_style("Mapo-gu", 0).palette.tolist() != district_style("Mapo-gu", 1).palette.tolist()
    means = np.array([[t.past.reshape(-1, 3).mean(0) for t in tiles] for tiles in sample_tiles.values()])
    district_means = means.mean(axis=1)                      # [25, 3]
    between = district_means.std(axis=0).mean()
    within = (means.std(axis=1) / np.sqrt(means.shape[1])).mean()  # standard error of a district's mean
    assert between > 4 * within, (between, within)           # non-IID: districts differ in colour
    styles = [district_style(d.name, 0) for d in load_districts()]
    assert len({round(s.density, 3) for s in styles}) == 25 and len({round(s.offset, 3) for s in styles}) == 25


def test_differencing_cannot_solve_it(sample_tiles):
    """Best pooled F1 of a threshold on |past - current| stays far below what a trained model reaches."""
    tiles = [t for group in sample_tiles.values() for t in group]
    truth = np.stack([t.mask() > 0 for t in tiles])
    difference = np.stack([np.abs(t.past.astype(np.int16) - t.current.astype(np.int16)).mean(-1) for t in tiles])
    best = 0.0
    for threshold in np.arange(0, 160, 2):
        predicted = difference > threshold
        tp = np.count_nonzero(predicted & truth)
        fp = np.count_nonzero(predicted & ~truth)
        fn = np.count_nonzero(~predicted & truth)
        best = max(best, 2 * tp / max(2 * tp + fp + fn, 1))
    assert 0.05 < best <= 0.5, best


def test_bad_options(tmp_path):
    code, output = run("synth", "--out", tmp_path / "s", "--districts", "Atlantis", "--quiet")
    assert code == 1 and "Error: unknown district 'Atlantis'" in output and "Traceback" not in output
    code, output = run("synth", "--out", tmp_path / "s", "--scale", "0", "--quiet")
    assert code == 1 and "Error: --scale 0: must be a finite number > 0" in output
    code, output = run("synth", "--out", tmp_path / "s", "--seed", "-1", "--quiet")
    assert code == 1 and "Error: --seed -1: must be an integer >= 0" in output


@pytest.mark.parametrize("scale, tile", [pytest.param(0.005, 32, id="small"),
                                         pytest.param(0.01, 64, id="issue", marks=pytest.mark.slow)])
def test_acceptance_synth_then_pack_gives_25_proportional_packs(tmp_path, scale, tile):
    """`nfed synth --scale 0.01 --tile 64` then `nfed pack`: 25 packs with max(8, round(0.01 x samples))
    training tiles and the fixed 16 validation and 24 test tiles each, which `nfed info` reads (the fast
    variant uses a smaller scale and tile)."""
    code, output = run("synth", "--out", tmp_path / "synth", "--scale", scale, "--tile", tile, "--quiet")
    assert code == 0, output
    code, output = run("pack", tmp_path / "synth", "--out", tmp_path / "packs", "--quiet")
    assert code == 0, output
    packs = sorted((tmp_path / "packs").glob("*.h5"))
    assert len(packs) == 25
    for district in load_districts():
        code, output = run("info", tmp_path / "packs" / f"{district.name}.h5", "--json")
        assert code == 0, output
        summary = json.loads(output)
        assert summary["district"] == district.name and summary["tile_size"] == tile
        assert summary["splits"]["train"]["tiles"] == max(8, round(scale * district.samples))
        assert (summary["splits"]["val"]["tiles"], summary["splits"]["test"]["tiles"]) == (16, 24)
        assert summary["change_pixel_share"] > 0


def test_fixed_evaluation_tiles_do_not_depend_on_scale(tmp_path):
    """The held-out tiles are the first indices and carry their split: two scales share the same test set,
    and `nfed pack` keeps the labels' splits (training tiles grow with the scale only)."""
    for name, scale in (("small", 0.002), ("large", 0.004)):
        synth.synthesise(tmp_path / name, scale=scale, tile=32, districts="Gangseo-gu", min_per_district=2,
                         val_tiles=3, test_tiles=4, jobs=1)
        pack_folder(tmp_path / name, tmp_path / f"{name}-packs")
    with DistrictPack(tmp_path / "small-packs" / "Gangseo-gu.h5") as small, \
            DistrictPack(tmp_path / "large-packs" / "Gangseo-gu.h5") as large:
        assert [small.num_samples(s) for s in ("train", "val", "test")] == [9, 3, 4]
        assert [large.num_samples(s) for s in ("train", "val", "test")] == [17, 3, 4]
        assert small.ids("test") == large.ids("test") == [f"Gangseo-gu_{i:05d}" for i in range(4)]
        np.testing.assert_array_equal(small.read("test", range(4))[0], large.read("test", range(4))[0])
        assert small.attrs["split_rule"] == "labels"


def test_pack_refuses_a_district_whose_labels_fix_only_some_splits(tmp_path):
    synth.synthesise(tmp_path / "s", scale=0.002, tile=32, districts="Nowon-gu", min_per_district=2,
                     val_tiles=1, test_tiles=1, jobs=1)
    label = next(iter(sorted((tmp_path / "s" / "Nowon-gu").glob("*.json"))))
    document = json.loads(label.read_text())
    del document["split"]
    label.write_text(json.dumps(document))
    code, output = run("pack", tmp_path / "s", "--out", tmp_path / "p", "--quiet")
    assert code == 1 and "label has no 'split' while other labels of Nowon-gu fix theirs" in output
    assert "Traceback" not in output


def test_synth_refuses_half_fixed_evaluation_tiles(tmp_path):
    code, output = run("synth", "--out", tmp_path / "s", "--val-tiles", "4", "--test-tiles", "0", "--quiet")
    assert code == 1 and "fix both (> 0) or neither" in output
