"""Damaged and unusual inputs (issue 25, items 7, 9, 10a): each bad file is one line that names it and
`nfed pack --skip-bad` packs around it; images of more than 8 bits a sample are scaled (value >> 8) or refused,
never clipped; a GeoTIFF mask that cannot be written completely leaves no file and no "wrote"."""
from __future__ import annotations

import contextlib
import json
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_levir_pack import all_ids, levir_pair
from test_pack import assert_one_line_error, make_source, run

from nfed.common.errors import DataError
from nfed.data import images
from nfed.data.pack import pack_folder

TILE = 32


def write_png(path: Path, width: int, height: int, rows: bytes, *, bit_depth: int, color_type: int) -> Path:
    """A PNG with the given IHDR and raw scanlines (filter bytes included): 16-bit samples and headers that
    declare more pixels than the data holds, which Pillow cannot write."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))
    return path


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG of [H, W] (grey), [H, W, 2] (grey + alpha), [H, W, 3] (RGB) or [H, W, 4] (RGBA) samples."""
    samples = samples if samples.ndim == 3 else samples[..., None]
    height, width, channels = samples.shape
    data = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), data], axis=1).tobytes()
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    return write_png(path, width, height, rows, bit_depth=16, color_type=color_type)


def write_blank_1bit_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit grey PNG of zeros: a few kilobytes that decode into width x height pixels (a decompression bomb)."""
    rows = bytes((1 + (width + 7) // 8) * height)
    return write_png(path, width, height, rows, bit_depth=1, color_type=0)


# ------------------------------------------------------------------------------------------ JSON labels

def test_json_label_nested_100000_deep_is_one_line_and_skip_bad_packs_the_rest(tmp_path):
    src = make_source(tmp_path / "src", {"Jung-gu": 3})
    (src / "Jung-gu" / "deep.json").write_text('{"tile_id": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, output, "src/Jung-gu/deep.json: not valid JSON (nested too deeply")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--skip-bad")
    assert code == 0, output
    assert "skipped 1 item(s):" in output and "skipped: src/Jung-gu/deep.json: not valid JSON" in output
    assert all_ids(tmp_path / "out" / "Jung-gu.h5") == ["Jung-gu_000", "Jung-gu_001", "Jung-gu_002"]


@pytest.mark.parametrize("where", ["size.width", "changes[0].polygon[0][0]"])
def test_json_label_number_beyond_a_float_is_one_line(where):
    from nfed.data.labels import label_document, parse_label

    document = label_document("t", "Jung-gu", "t_a.png", "t_b.png", 32, 32, [("new", [(1, 1), (9, 1), (9, 9)])])
    if where == "size.width":
        document["size"]["width"] = 10 ** 400
    else:
        document["changes"][0]["polygon"][0][0] = 10 ** 400
    with pytest.raises(DataError, match=r"t\.json: " + re.escape(where) + r": 1000+\.\.\. is not a finite number"):
        parse_label(document, "t.json")


# ------------------------------------------------------------------------------------- GeoJSON labels

GOOD_FEATURE = {"type": "Feature", "properties": {"type": "new"},
                "geometry": {"type": "Polygon", "coordinates": [[[310001.0, 4159999.0], [310010.0, 4159999.0],
                                                                 [310010.0, 4159990.0], [310001.0, 4159990.0],
                                                                 [310001.0, 4159999.0]]]}}
URN = "urn:ogc:def:crs:EPSG::32652"


def geojson(features, crs=None) -> dict:
    crs = {"type": "name", "properties": {"name": URN}} if crs is None else crs
    return {"type": "FeatureCollection", "crs": crs, "features": features}


def geotiff_source(root: Path, labels: dict[str, dict | str], size: int = 64) -> Path:
    """SRC/Jung-gu/{A,B}/<stem>.tif (UTM 52N, 0.5 m pixels) and label/<stem>.geojson for each label given."""
    rasterio = pytest.importorskip("rasterio", reason="rasterio not installed (pip install 'nfed[geo]')")
    from affine import Affine

    district = root / "Jung-gu"
    rng = np.random.default_rng(0)
    for stem, label in labels.items():
        for side in ("A", "B"):
            (district / side).mkdir(parents=True, exist_ok=True)
            with rasterio.open(district / side / f"{stem}.tif", "w", driver="GTiff", height=size, width=size,
                               count=3, dtype="uint8", crs="EPSG:32652",
                               transform=Affine(0.5, 0.0, 310000.0, 0.0, -0.5, 4160000.0)) as target:
                target.write(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
        (district / "label").mkdir(exist_ok=True)
        text = label if isinstance(label, str) else json.dumps(label)
        (district / "label" / f"{stem}.geojson").write_text(text)
    return root


BAD_GEOJSON = {
    "feature given as a list": (geojson([GOOD_FEATURE, [GOOD_FEATURE]]), r"features\[1\]: not a GeoJSON Feature"),
    "geometry given as a list": (geojson([{**GOOD_FEATURE, "geometry": [1, 2]}]), r"features\[0\]\.geometry"),
    "coordinates as a string": (geojson([{**GOOD_FEATURE, "geometry": {"type": "Polygon",
                                                                       "coordinates": "310001,4159999"}}]),
                                r"features\[0\]\.geometry\.coordinates"),
    "point as a string": (geojson([{**GOOD_FEATURE, "geometry": {
        "type": "Polygon", "coordinates": [["310001 4159999"] * 4]}}]),
        r"features\[0\]\.geometry\.coordinates\[0\]\[0\]"),
    "nested too deep": (geojson([{**GOOD_FEATURE, "geometry": {
        "type": "MultiPolygon", "coordinates": [[[[[310001.0, 4159999.0]]] * 4]]}}]),
        r"features\[0\]\.geometry\.coordinates\[0\]\[0\]\[0\]: \[\[310001"),
    "coordinate beyond a float": (geojson([{**GOOD_FEATURE, "geometry": {
        "type": "Polygon", "coordinates": [[[10 ** 400, 4159999.0]] + [[310001.0, 4159999.0]] * 3]}}]),
        r"features\[0\]\.geometry\.coordinates\[0\]\[0\]: \[1000"),
    "ring of three positions": (geojson([{**GOOD_FEATURE, "geometry": {
        "type": "Polygon", "coordinates": [[[310001.0, 4159999.0], [310010.0, 4159999.0], [310010.0, 4159990.0]]]}}]),
        r"features\[0\]\.geometry\.coordinates\[0\]: a ring needs at least 4 positions"),
    "type property as a list": (geojson([{**GOOD_FEATURE, "properties": {"type": ["new"]}}]),
                                r"features\[0\]\.properties\.type"),
    "properties as a list": (geojson([{**GOOD_FEATURE, "properties": ["new"]}]), r"features\[0\]\.properties"),
    "crs as a list": (geojson([GOOD_FEATURE], crs=[URN]), r"crs"),
    "crs name as a number": (geojson([GOOD_FEATURE], crs={"type": "name", "properties": {"name": 32652}}), r"crs"),
    "features as an object": ({"type": "FeatureCollection", "features": {"0": GOOD_FEATURE}},
                              "not a GeoJSON FeatureCollection"),
    "nested 100000 deep": ('{"type": "FeatureCollection", "features": ' + "[" * 100_000 + "]" * 100_000 + "}",
                           r"not valid JSON \(nested too deeply"),
}


@pytest.mark.parametrize("bad", list(BAD_GEOJSON))
def test_wrongly_typed_geojson_is_one_data_error_naming_the_file(tmp_path, bad):
    label, needle = BAD_GEOJSON[bad]
    src = geotiff_source(tmp_path / "src", {"a": geojson([GOOD_FEATURE]), "b": label})
    with pytest.raises(DataError, match=r"label/b\.geojson: " + needle):
        pack_folder(src, tmp_path / "out", tile=TILE)
    report = pack_folder(src, tmp_path / "out", tile=TILE, skip_bad=True)
    assert list(report.written) == ["Jung-gu"] and len(report.skipped) == 1 and "b.geojson" in report.skipped[0]


def test_geojson_feature_as_a_list_through_the_cli(tmp_path):
    src = geotiff_source(tmp_path / "src", {"a": geojson([GOOD_FEATURE]), "b": geojson([[GOOD_FEATURE]])})
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--tile", TILE)
    assert_one_line_error(code, output, "label/b.geojson: features[0]: not a GeoJSON Feature")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--tile", TILE, "--skip-bad")
    assert code == 0, output
    assert "skipped 1 item(s):" in output and "b.geojson: features[0]" in output
    assert all_ids(tmp_path / "out" / "Jung-gu.h5") == ["a_y0000_x0000", "a_y0000_x0032", "a_y0032_x0000",
                                                        "a_y0032_x0032"]
