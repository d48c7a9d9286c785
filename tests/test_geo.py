"""GeoTIFF pairs (nfed[geo]): windowed reading, GeoTIFF masks with the input's georeference, GeoJSON in the
raster's CRS. The tests write their own small GeoTIFFs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nfed.cli import cli
from nfed.common.errors import DataError
from nfed.training.predict import OutputOptions, predict_arrays, predict_files

rasterio = pytest.importorskip("rasterio", reason="rasterio not installed (pip install 'nfed[geo]')")
pytest.importorskip("shapely", reason="shapely not installed (pip install 'nfed[geo]')")

from affine import Affine  # noqa: E402
from test_predict_outputs import TILE, balanced_model, image_pair  # noqa: E402

HEIGHT, WIDTH = 100, 150            # 4 rows x 5 columns of 32 px tiles
CRS = "EPSG:32652"                  # UTM 52N (Seoul)
TRANSFORM = Affine(0.5, 0.0, 310000.0, 0.0, -0.5, 4160000.0)


def write_geotiff(path: Path, image: np.ndarray, *, crs=CRS, transform=TRANSFORM, dtype="uint8") -> Path:
    """A tiled RGB GeoTIFF of `image` [H, W, 3] (blocks of 16 px, so windows map to a few blocks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=image.shape[0], width=image.shape[1], count=3, dtype=dtype,
                       crs=crs, transform=transform, tiled=True, blockxsize=16, blockysize=16) as target:
        target.write(np.moveaxis(image, -1, 0).astype(dtype))
    return path


@pytest.fixture(scope="module")
def geo_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geo")
    past, current = image_pair(HEIGHT, WIDTH, seed=3)
    write_geotiff(folder / "A" / "scene.tif", past)
    write_geotiff(folder / "B" / "scene.tif", current)
    return folder, balanced_model(5, past, current), past, current


def test_geotiff_pair_is_read_by_window_and_georeferenced_outputs_follow(geo_setup, tmp_path, monkeypatch):
    folder, model, past, current = geo_setup
    reads = []
    original = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        reads.append((kwargs.get("window"), kwargs.get("out_shape")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    out = tmp_path / "scene.tif"
    summary = predict_files(model, folder / "A" / "scene.tif", folder / "B" / "scene.tif", out, TILE,
                            outputs=OutputOptions(polygons=True, overlay=True, min_area=4, simplify=0))
    monkeypatch.undo()

    windows = [window for window, out_shape in reads if out_shape is None]
    assert windows and all(window is not None for window in windows)          # never a whole-raster read
    assert max(window.height for window in windows) <= 2 * TILE < HEIGHT
    assert sum(window.height for window in windows) >= 2 * HEIGHT             # every row of both dates
    previews = [out_shape for window, out_shape in reads if out_shape is not None]
    assert len(previews) == 1                                                  # the overlay's decimated read

    classes, _ = predict_arrays(model, past, current, TILE)
    with rasterio.open(out) as mask:
        assert mask.crs == rasterio.crs.CRS.from_string(CRS) and mask.transform == TRANSFORM
        assert (mask.width, mask.height, mask.count, mask.dtypes[0]) == (WIDTH, HEIGHT, 1, "uint8")
        np.testing.assert_array_equal(mask.read(1), np.where(classes > 0, 255, 0))

    geojson = json.loads(out.with_suffix(".geojson").read_text())
    assert geojson["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32652"
    west, north = TRANSFORM.c, TRANSFORM.f
    for feature in geojson["features"]:
        xs, ys = zip(*(point for ring in feature["geometry"]["coordinates"] for point in ring))
        assert west <= min(xs) and max(xs) <= west + WIDTH * 0.5
        assert north - HEIGHT * 0.5 <= min(ys) and max(ys) <= north
        assert feature["properties"]["area"] == pytest.approx(feature["properties"]["pixels"] * 0.25)
    assert geojson["features"] and summary["rows"]
    assert {row["type"] for row in summary["rows"]} <= {"new", "demolished", "renewed", "recoloured"}
    assert out.with_name("scene_overlay.png").is_file() and out.with_suffix(".json").is_file()


def test_png_mask_from_geotiff_pair_and_pairs_folder_of_geotiffs(geo_setup, tmp_path):
    folder, model, past, current = geo_setup
    from nfed.model.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "m.h5", model.state_dict(),
                                 config={"width": model.width, "classes": 5, "lambda_rec": 0.0, "tile": TILE})
    result = CliRunner().invoke(cli, ["predict", "--model", str(checkpoint), "--pairs", str(folder), "--out",
                                      str(tmp_path / "masks"), "--polygons", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "masks" / "scene.tif").is_file() and (tmp_path / "masks" / "scene.geojson").is_file()
    assert (tmp_path / "masks" / "changes.csv").is_file()


def test_mismatched_or_unsupported_geotiffs_fail_in_one_line(geo_setup, tmp_path):
    folder, model, past, current = geo_setup
    moved = write_geotiff(tmp_path / "moved.tif", current, transform=Affine(0.5, 0.0, 310100.0, 0.0, -0.5, 4160000.0))
    deep = write_geotiff(tmp_path / "deep.tif", current, dtype="uint16")
    for other, needle in ((moved, "differ in CRS or transform"), (deep, "8-bit")):
        with pytest.raises(DataError, match=needle):
            predict_files(model, folder / "A" / "scene.tif", other, tmp_path / "m.tif", TILE)
    assert not (tmp_path / "m.tif").exists()


def _predicted_geojson(geo_setup, tmp_path) -> tuple[dict, np.ndarray]:
    folder, model, past, current = geo_setup
    out = tmp_path / "predicted" / "scene.tif"
    predict_files(model, folder / "A" / "scene.tif", folder / "B" / "scene.tif", out, TILE,
                  outputs=OutputOptions(polygons=True, min_area=0, simplify=0))
    return json.loads(out.with_suffix(".geojson").read_text()), predict_arrays(model, past, current, TILE)[0]


def _geotiff_source(geo_setup, root: Path, geojson: dict) -> Path:
    import shutil

    folder = geo_setup[0]
    district = root / "Jung-gu"
    for side in ("A", "B"):
        (district / side).mkdir(parents=True)
        shutil.copy(folder / side / "scene.tif", district / side / "scene.tif")
    (district / "label").mkdir()
    (district / "label" / "scene.geojson").write_text(json.dumps(geojson))
    return root


def _pack_masks(pack_path: Path) -> dict[str, np.ndarray]:
    from nfed.data.reader import DistrictPack

    masks = {}
    with DistrictPack(pack_path) as pack:
        for split in ("train", "val", "test"):
            _, _, mask, ids = pack.read(split, range(pack.num_samples(split)))
            masks.update(zip(ids, mask))
    return masks


@pytest.mark.parametrize("lonlat", [False, True], ids=["crs-member", "rfc7946-lonlat"])
def test_geotiff_pairs_with_geojson_labels_pack_into_the_labelled_mask(geo_setup, tmp_path, monkeypatch, lonlat):
    import h5py
    from rasterio.warp import transform_geom

    from nfed.data.labels import CHANGE_CODES
    from nfed.data.pack import pack_folder
    from nfed.data.packformat import MASK_VALUES_BINARY, MASK_VALUES_TYPED

    geojson, classes = _predicted_geojson(geo_setup, tmp_path)
    if lonlat:                  # RFC 7946: no crs member, lon/lat coordinates; and no change types
        del geojson["crs"]
        for feature in geojson["features"]:
            feature["geometry"] = transform_geom(CRS, "OGC:CRS84", feature["geometry"], precision=-1)
            del feature["properties"]["type"]
    src = _geotiff_source(geo_setup, tmp_path / "src", geojson)
    reads = []
    original = rasterio.io.DatasetReader.read
    monkeypatch.setattr(rasterio.io.DatasetReader, "read",
                        lambda self, *a, **k: reads.append(k.get("window")) or original(self, *a, **k))
    report = pack_folder(src, tmp_path / "packs", tile=TILE)
    monkeypatch.undo()
    assert report.source_format == "geotiff" and set(report.written) == {"Jung-gu"}
    assert reads and all(w is not None and w.height <= TILE and w.width <= TILE for w in reads)
    masks = _pack_masks(report.written["Jung-gu"])
    assert len(masks) == (HEIGHT // TILE) * (WIDTH // TILE)
    codes = {CHANGE_CODES.get(f["properties"].get("type"), 1) for f in geojson["features"]}
    with h5py.File(report.written["Jung-gu"]) as pack:
        assert pack.attrs["mask_values"] == (MASK_VALUES_BINARY if lonlat else MASK_VALUES_TYPED)
    for tile_id, mask in masks.items():
        y, x = int(tile_id.split("_y")[1][:4]), int(tile_id.split("_x")[1][:4])
        np.testing.assert_array_equal(mask > 0, classes[y:y + TILE, x:x + TILE] > 0)
        assert set(np.unique(mask)) - {0} <= codes


def test_bad_geojson_labels_fail_in_one_line_naming_the_feature(geo_setup, tmp_path):
    from nfed.data.pack import pack_folder

    geojson, _ = _predicted_geojson(geo_setup, tmp_path)
    bad_type = json.loads(json.dumps(geojson))
    bad_type["features"][1]["properties"]["type"] = "built"
    with pytest.raises(DataError, match=r"scene.geojson: features\[1\].properties.type: 'built'"):
        pack_folder(_geotiff_source(geo_setup, tmp_path / "t", bad_type), tmp_path / "p1", tile=TILE)
    elsewhere = json.loads(json.dumps(geojson))
    del elsewhere["crs"]                                  # projected metres read as lon/lat: off the raster
    with pytest.raises(DataError, match=r"features\[0\]: lies outside the raster"):
        pack_folder(_geotiff_source(geo_setup, tmp_path / "o", elsewhere), tmp_path / "p2", tile=TILE)
    assert not (tmp_path / "p1").exists() or not any((tmp_path / "p1").iterdir())
