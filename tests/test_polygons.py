"""Change polygons: exact outlines (GDAL's polygonize as oracle), filters, types, confidence, and the round
trip prediction -> label JSON -> nfed's rasteriser -> mask."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from nfed.data.labels import parse_label, rasterise
from nfed.data.polygons import change_regions, label_outlines, summarise
from nfed.data.vectors import Georeference, geojson_document, label_json_document

shapely = pytest.importorskip("shapely", reason="shapely not installed (pip install 'nfed[geo]')")


def blob_mask(seed: int, size: int = 96, threshold: float = 0.53) -> np.ndarray:
    """Irregular building-like blobs (with oblique edges, necks and some holes)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random((size, size)), 3) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsimplified_outlines_equal_gdal_polygonize_and_cover_exactly_the_pixels(seed):
    rasterio_features = pytest.importorskip("rasterio.features", reason="rasterio not installed (nfed[geo])")
    mask = blob_mask(seed)
    regions = change_regions(mask.astype(np.uint8), mask.astype(np.float32), typed=False, min_area=0, simplify=0)
    oracle = [shapely.geometry.shape(geometry) for geometry, _ in
              rasterio_features.shapes(mask.astype(np.uint8), mask=mask, connectivity=4)]
    assert len(regions) == len(oracle) == ndimage.label(mask)[1]
    ours = shapely.union_all([r.geometry for r in regions])
    assert ours.symmetric_difference(shapely.union_all(oracle)).area == 0
    assert all(r.geometry.is_valid and r.geometry.area == r.pixels for r in regions)
    assert sum(r.pixels for r in regions) == mask.sum()


def test_min_area_drops_small_regions_and_fills_small_holes():
    mask = np.zeros((40, 40), bool)
    mask[2:4, 2:4] = True                   # 4 px: dropped
    mask[10:30, 10:30] = True               # 400 px with a 4 px hole (filled) and a 36 px hole (kept)
    mask[12:14, 12:14] = False
    mask[20:26, 20:26] = False
    regions = change_regions(mask.astype(np.uint8), mask.astype(np.float32), typed=False, min_area=10, simplify=0)
    assert len(regions) == 1
    polygon = regions[0].geometry
    assert len(polygon.interiors) == 1 and polygon.area == 400 - 36
    assert regions[0].pixels == 400 - 4 - 36


def test_type_is_the_most_frequent_pixel_type_and_confidence_the_mean_probability():
    classes = np.zeros((32, 32), np.uint8)
    classes[4:12, 4:12] = 2                 # demolished, with a strip of "new" pixels
    classes[4:6, 4:12] = 1
    classes[20:28, 16:30] = 4               # recoloured
    rng = np.random.default_rng(0)
    probability = rng.random((32, 32)).astype(np.float32)
    regions = change_regions(classes, probability, typed=True, min_area=1, simplify=0)
    by_type = {r.type: r for r in regions}
    assert set(by_type) == {"demolished", "recoloured"}
    for kind, window in (("demolished", (slice(4, 12), slice(4, 12))), ("recoloured", (slice(20, 28), slice(16, 30)))):
        expected = np.mean([float(probability[y, x]) for y in range(window[0].start, window[0].stop)
                            for x in range(window[1].start, window[1].stop)])
        assert by_type[kind].confidence == pytest.approx(expected, rel=1e-9)
    assert summarise(regions, 0.25) == {"demolished": {"count": 1, "pixels": 64, "area": 16.0},
                                        "recoloured": {"count": 1, "pixels": 112, "area": 28.0}}


def test_untyped_model_regions_are_change():
    mask = np.zeros((16, 16), np.uint8)
    mask[2:9, 3:10] = 1
    [region] = change_regions(mask, np.full(mask.shape, 0.75, np.float32), typed=False)
    assert region.type == "change" and region.confidence == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_json_validates_and_packs_back_into_the_predicted_mask(seed, tmp_path):
    classes = blob_mask(seed).astype(np.uint8) * np.uint8(1 + seed % 4)
    for simplify, min_iou in ((0, 0.99), (0.5, 0.95)):
        regions = change_regions(classes, np.ones(classes.shape, np.float32), typed=True, min_area=0,
                                 simplify=simplify)
        label_path = tmp_path / "labels" / f"t{seed}.json"
        document = label_json_document(regions, label_path=label_path, past=tmp_path / "A" / "t.png",
                                       current=tmp_path / "B" / "t.png", width=96, height=96, district="Jung-gu",
                                       source="test")
        assert document["images"] == {"past": "../A/t.png", "current": "../B/t.png"}
        label = parse_label(json.loads(json.dumps(document)), label_path)   # schema-valid after a JSON trip
        assert all(len(change.polygon) >= 3 for change in label.changes)
        back = rasterise(label)
        assert iou(back > 0, classes > 0) >= min_iou, (simplify, iou(back > 0, classes > 0))
        assert set(np.unique(back)) <= {0, int(classes.max())}


def test_real_levir_labels_round_trip_with_the_default_simplification(levir_dir):
    from PIL import Image

    from nfed.data.labels import rasterise_polygons
    from nfed.data.polygons import DEFAULT_SIMPLIFY

    scores = []
    for path in sorted((levir_dir / "label").glob("*.png")):
        mask = np.asarray(Image.open(path).convert("L")) >= 128
        if mask.any():
            regions = change_regions(mask.astype(np.uint8), mask.astype(np.float32), typed=False, min_area=0,
                                     simplify=DEFAULT_SIMPLIFY)
            outlines = [(1, outline) for region in regions for outline in label_outlines(region)]
            scores.append(iou(rasterise_polygons(mask.shape[1], mask.shape[0], outlines) > 0, mask))
    assert len(scores) >= 5 and min(scores) >= 0.95, scores


def test_label_outlines_of_hole_free_regions_round_trip_exactly():
    mask = blob_mask(5)
    filled = ndimage.binary_fill_holes(mask)
    regions = change_regions(filled.astype(np.uint8), filled.astype(np.float32), typed=False, min_area=0, simplify=0)
    from nfed.data.labels import rasterise_polygons
    back = rasterise_polygons(96, 96, [(1, outline) for r in regions for outline in label_outlines(r)])
    assert np.array_equal(back > 0, filled)


def test_geojson_maps_pixel_edges_through_the_geotransform():
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 10:20] = 1                    # one 10 x 4 px rectangle
    regions = change_regions(mask, np.full(mask.shape, 0.9, np.float32), typed=False, min_area=0, simplify=0)
    georeference = Georeference((0.5, 0.0, 300000.0, 0.0, -0.5, 4100000.0), "urn:ogc:def:crs:EPSG::32652")
    document = geojson_document(regions, name="t", georeference=georeference)
    assert document["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32652"
    [feature] = document["features"]
    ring = feature["geometry"]["coordinates"][0]
    xs, ys = {x for x, _ in ring}, {y for _, y in ring}
    assert xs == {300005.0, 300010.0} and ys == {4099999.0, 4099997.0}
    assert shapely.LinearRing(ring).is_ccw                          # RFC 7946 exterior orientation
    assert feature["properties"] == {"type": "change", "confidence": 0.9, "pixels": 40, "area": 10.0}
    assert document["nfed"]["summary"] == {"change": {"count": 1, "pixels": 40, "area": 10.0}}
    plain = geojson_document(regions, name="t")
    assert "crs" not in plain and {x for x, _ in plain["features"][0]["geometry"]["coordinates"][0]} == {10, 20}
