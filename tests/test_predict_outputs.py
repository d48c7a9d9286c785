"""nfed predict's GIS outputs on PNG pairs: polygons (GeoJSON, label JSON that packs back), per-image
summary CSV, overlay PNG; band-wise tiling equal to whole-image prediction."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from nfed.cli import cli
from nfed.data.labels import CHANGE_TYPES, rasterise, read_label
from nfed.model.checkpoint import save_checkpoint
from nfed.model.wnet import WNetCD
from nfed.training.predict import ArrayPair, predict_arrays, predict_bands

requires_shapely = pytest.mark.skipif(importlib.util.find_spec("shapely") is None,
                                      reason="shapely not installed (pip install 'nfed[geo]')")

TILE = 32
WIDTH = 4


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def image_pair(height: int = 70, width: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random past/current images (features larger than a pixel, so regions form)."""
    rng = np.random.default_rng(seed)
    images = [ndimage.gaussian_filter(rng.random((height, width, 3)), (3, 3, 0)) for _ in range(2)]
    return tuple((255 * (i - i.min()) / (i.max() - i.min())).astype(np.uint8) for i in images)


def balanced_model(classes: int, past: np.ndarray, current: np.ndarray) -> WNetCD:
    """A W-Net-CD whose head is amplified (untrained logits barely vary) and whose no-change bias is shifted
    so that about half the pixels of this pair are change."""
    model = WNetCD(width=WIDTH, classes=classes, lambda_rec=0.0, rng=np.random.default_rng(0))
    model.encoder.head.weight.data *= np.float32(100)
    logits = model.change_logits(*[image[None, :64, :64].transpose(0, 3, 1, 2).astype(np.float32) / 255
                                   for image in (past, current)])
    margin = logits[:, 1:].max(axis=1) - logits[:, 0]
    model.encoder.head.bias.data[0] += np.float32(np.median(margin))
    return model


@pytest.fixture(scope="module", params=[2, 5], ids=["2-class", "5-class"])
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"predict{request.param}")
    past, current = image_pair()
    for name, image in (("A", past), ("B", current)):
        (folder / name).mkdir()
        Image.fromarray(image).save(folder / name / "t1.png")
    model = balanced_model(request.param, past, current)
    checkpoint = save_checkpoint(folder / "model.h5", model.state_dict(),
                                 config={"width": WIDTH, "classes": request.param, "lambda_rec": 0.0, "tile": TILE})
    return folder, checkpoint, model, past, current


def test_bands_equal_whole_image_tiling_for_any_band_height(setup):
    _, _, model, past, current = setup
    whole, whole_change = predict_arrays(model, past, current, TILE, batch_size=64)
    pair = ArrayPair(past, current)
    for batch_size in (1, 3, 4):            # 1 tile row per band (several batches), 1 row, 2 rows per band
        classes = np.zeros_like(whole)
        reads = []

        def read_rows(start, stop):
            reads.append((start, stop))
            return pair.read_rows(start, stop)

        for y0, band, _ in predict_bands(model, read_rows, 70, 90, TILE, batch_size=batch_size):
            classes[y0:y0 + len(band)] = band
        np.testing.assert_array_equal(classes, whole)
        assert max(stop - start for start, stop in reads) <= 2 * TILE < 70
    assert 0.2 < (whole > 0).mean() < 0.8           # the balanced model does predict both
    assert (whole_change[whole > 0] > 0.5).all()    # argmax says change, so P(change) > 1/2
    if model.classes == 2:
        assert (whole_change[whole == 0] <= 0.5).all()


@requires_shapely
def test_predict_writes_mask_polygons_label_geojson_overlay_and_summary(setup, tmp_path):
    folder, checkpoint, model, past, current = setup
    out = tmp_path / "out" / "t1.png"
    result = invoke("predict", "--model", checkpoint, "--past", folder / "A" / "t1.png", "--current",
                    folder / "B" / "t1.png", "--out", out, "--polygons", "--overlay", "--min-area", 4,
                    "--simplify", 0, "--district", "Jung-gu")
    assert result.exit_code == 0, result.output
    for name in ("t1.png", "t1.geojson", "t1.json", "t1_overlay.png", "t1_changes.csv"):
        assert (out.parent / name).is_file(), name
    classes, change = predict_arrays(model, past, current, TILE)
    mask = np.asarray(Image.open(out)) > 0
    np.testing.assert_array_equal(mask, classes > 0)

    geojson = json.loads((out.parent / "t1.geojson").read_text())
    features = geojson["features"]
    assert features and "crs" not in geojson
    kinds = set(CHANGE_TYPES) if model.classes == 5 else {"change"}
    for feature in features:
        properties = feature["properties"]
        assert properties["type"] in kinds and properties["pixels"] >= 4
        assert 0.5 < properties["confidence"] <= 1.0     # argmax says change, so P(change) > 1/2
    assert sum(f["properties"]["pixels"] for f in features) <= mask.sum()

    label = read_label(out.parent / "t1.json")          # schema-valid, images resolve to the inputs
    assert label.past.resolve() == (folder / "A" / "t1.png").resolve() and label.district == "Jung-gu"
    back = rasterise(label) > 0             # every kept pixel comes back; labels have no holes, so they may fill
    kept = _regions_at_least(mask, 4)
    assert not (kept & ~back).any() and not (back & ~ndimage.binary_fill_holes(kept)).any()
    if model.classes == 5:      # each polygon's type is its pixels' majority type
        for change, feature in zip(label.changes, features):
            assert change.type == feature["properties"]["type"]

    rows = list(csv.DictReader((out.parent / "t1_changes.csv").open()))
    assert {r["type"]: int(r["count"]) for r in rows} == {
        kind: sum(f["properties"]["type"] == kind for f in features) for kind in kinds
        if any(f["properties"]["type"] == kind for f in features)}
    assert "change regions" in result.output


def _regions_at_least(mask: np.ndarray, min_area: int) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    return keep[labels]


@requires_shapely
def test_predicted_label_json_packs_back_as_training_data(setup, tmp_path):
    from nfed.data.pack import pack_folder
    from nfed.data.reader import DistrictPack

    folder, checkpoint, model, past, current = setup
    labels = tmp_path / "labels"
    result = invoke("predict", "--model", checkpoint, "--pairs", folder, "--out", labels, "--polygons",
                    "--district", "Jung-gu", "--quiet")
    assert result.exit_code == 0, result.output
    assert (labels / "changes.csv").is_file()
    report = pack_folder(labels, tmp_path / "packs", fmt="json", tile=TILE)
    assert set(report.written) == {"Jung-gu"}
    label = rasterise(read_label(labels / "t1.json"))
    with DistrictPack(report.written["Jung-gu"]) as pack:
        tiles = sum(pack.num_samples(s) for s in ("train", "val", "test"))
        assert tiles == (70 // TILE) * (90 // TILE)
        change_pixels = sum(int((pack.read(s, range(pack.num_samples(s)))[2] > 0).sum())
                            for s in ("train", "val", "test"))
    assert change_pixels == int((label[:64, :64] > 0).sum())


@requires_shapely
def test_overlay_outlines_changes_in_type_colours_with_a_legend(setup, tmp_path):
    from nfed.data.overlay import TYPE_COLOURS, render_overlay
    from nfed.data.polygons import change_regions

    _, _, model, past, current = setup
    classes, change = predict_arrays(model, past, current, TILE)
    regions = change_regions(classes, change, typed=model.classes > 2, min_area=4, simplify=0)
    image = np.asarray(render_overlay(current, regions, typed=model.classes > 2))
    assert image.shape == current.shape
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    for region in regions:
        assert TYPE_COLOURS[region.type] in colours
    plain = np.asarray(render_overlay(current, regions, typed=model.classes > 2, legend=False))
    legend = (image != plain).any(axis=2)
    rows, cols = np.nonzero(legend)
    assert rows.min() == cols.min() == 0 and not legend[-5:, -5:].any()     # a box in the top-left corner
    for kind in (CHANGE_TYPES if model.classes > 2 else ("change",)):   # with every type's swatch
        assert TYPE_COLOURS[kind] in {tuple(c) for c in image[legend]}
    # outlines (4 px with their halo, centred on pixel edges) run along the kept regions' boundaries only
    outline = (plain != current).any(axis=2)
    kept = _regions_at_least(classes > 0, 4)
    boundary = ndimage.binary_dilation(kept) ^ ndimage.binary_erosion(kept)
    near = ndimage.binary_dilation(boundary, structure=np.ones((3, 3), bool), iterations=2)
    assert outline.any() and not (outline & ~near).any()


def test_polygon_options_are_checked(setup, tmp_path):
    folder, checkpoint, *_ = setup
    base = ["predict", "--model", checkpoint, "--past", folder / "A" / "t1.png", "--current", folder / "B" / "t1.png",
            "--out", tmp_path / "m.png"]
    for option, value in (("--min-area", -1), ("--simplify", -0.5)):
        result = invoke(*base, option, value)
        assert result.exit_code == 1 and option in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("missing,args,needle", [
    ("shapely", ["--polygons"], "nfed[geo]"), ("shapely", ["--overlay"], "nfed[geo]"),
    ("rasterio", [], "nfed[geo]")])
def test_missing_optional_packages_are_named_in_one_line(setup, tmp_path, monkeypatch, missing, args, needle):
    folder, checkpoint, *_ = setup
    monkeypatch.setitem(sys.modules, missing, None)            # import fails as if not installed
    out = tmp_path / ("m.tif" if missing == "rasterio" else "m.png")
    result = invoke("predict", "--model", checkpoint, "--past", folder / "A" / "t1.png", "--current",
                    folder / "B" / "t1.png", "--out", out, *args)
    assert result.exit_code == 1 and needle in result.output and "\n" not in result.output.strip(), result.output
    assert not out.exists()
