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


def test_geotiff_cut_short_is_skipped_by_name(tmp_path):
    src = geotiff_source(tmp_path / "src", {"a": geojson([GOOD_FEATURE]), "b": geojson([GOOD_FEATURE])}, size=256)
    damaged = src / "Jung-gu" / "B" / "b.tif"
    damaged.write_bytes(damaged.read_bytes()[:60_000])       # the header survives, most pixels do not
    with pytest.raises(DataError, match=r"B/b\.tif: unreadable raster"):
        pack_folder(src, tmp_path / "out", tile=128)
    report = pack_folder(src, tmp_path / "out", tile=128, skip_bad=True)
    assert len(report.skipped) == 1 and "b.tif" in report.skipped[0]
    assert all_ids(tmp_path / "out" / "Jung-gu.h5") == [f"a_y{y:04d}_x{x:04d}" for y in (0, 128) for x in (0, 128)]


# ------------------------------------------------------------------------------------ decompression bombs

def test_decompression_bomb_is_one_line_and_skip_bad_packs_the_rest(tmp_path):
    src = tmp_path / "levir"
    for i in range(2):
        levir_pair(src, f"p{i}", 32, 32, seed=i)
    for side in ("A", "B", "label"):
        write_blank_1bit_png(src / side / "bomb.png", 20_000, 20_000)   # 400 million pixels in ~60 kB
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--tile", TILE)
    assert_one_line_error(code, output, "levir/A/bomb.png: image too large to decode")
    code, output = run("pack", src, "--out", tmp_path / "out", "--quiet", "--tile", TILE, "--skip-bad")
    assert code == 0, output
    assert "skipped 1 item(s):" in output and "skipped: levir/A/bomb.png: image too large to decode" in output
    assert all_ids(tmp_path / "out" / "levir.h5") == ["p0", "p1"]


def test_image_over_the_pixel_budget_is_refused_before_decoding(tmp_path):
    """Pillow only warns between its limit and twice that; nfed refuses, without decoding or warning."""
    path = write_blank_1bit_png(tmp_path / "big.png", 10_000, 10_000)
    assert path.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for read in (images.read_rgb, images.read_binary_mask):
            with pytest.raises(DataError, match=r"big\.png: image too large to decode \(10000x10000"):
                read(path)
        assert images.image_size(path) == (10_000, 10_000)       # the header alone is fine


def test_pixel_budget_follows_the_memory_and_never_drops_below_a_tile(tmp_path, monkeypatch):
    src = tmp_path / "levir"
    for i in range(3):
        levir_pair(src, f"p{i}", 100, 100, seed=i)
    monkeypatch.setattr(images, "memory_limit_bytes", lambda: 64 * 64 * images.DECODED_BYTES_PER_PIXEL)
    assert images.pixel_budget() == 64 * 64 and images.pixel_budget(tile=80) == 80 * 80
    with pytest.raises(DataError, match=r"levir/A/p0\.png: image too large to decode \(100x100"):
        pack_folder(src, tmp_path / "out", tile=TILE)
    assert pack_folder(src, tmp_path / "out", tile=100).written


# ------------------------------------------------------------------------------ more than 8 bits a sample

SAMPLES16 = np.array([[0, 255, 256, 4095], [32767, 32768, 40000, 65535]], np.uint16)
SCALED = (SAMPLES16 >> 8).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey+alpha", "rgb", "rgba"])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, channels):
    planes = [SAMPLES16] if channels <= 2 else [SAMPLES16, 65535 - SAMPLES16, SAMPLES16 // 3]
    alpha = [np.full_like(SAMPLES16, 65535)] if channels in (2, 4) else []
    samples = np.dstack(planes + alpha)
    rgb = images.read_rgb(write_png16(tmp_path / "deep.png", samples))
    expected = [(plane >> 8).astype(np.uint8) for plane in planes]
    np.testing.assert_array_equal(rgb, np.dstack(expected * 3 if channels <= 2 else expected))


def test_16_bit_label_thresholds_at_half_range_or_is_refused(tmp_path):
    mask = images.read_binary_mask(write_png16(tmp_path / "full.png", SAMPLES16))
    np.testing.assert_array_equal(mask, (SAMPLES16 >= 32768).astype(np.uint8))
    binary = np.where(SAMPLES16 >= 32768, 65535, 0).astype(np.uint16)
    np.testing.assert_array_equal(images.read_binary_mask(write_png16(tmp_path / "binary.png", binary)),
                                  binary > 0)
    small = np.where(SAMPLES16 >= 32768, 255, 0).astype(np.uint16)      # 0/255 values saved as 16-bit
    with pytest.raises(DataError, match=r"small\.png: 16-bit label whose values reach only 255"):
        images.read_binary_mask(write_png16(tmp_path / "small.png", small))


def test_16_bit_levir_pair_packs_scaled(tmp_path):
    src = tmp_path / "levir"
    levir_pair(src, "p0", 32, 32)
    grey = np.tile(np.arange(32, dtype=np.uint16) * 2048, (32, 1))
    write_png16(src / "A" / "p0.png", grey)
    pack_folder(src, tmp_path / "out", tile=TILE)
    from nfed.data.reader import DistrictPack

    with DistrictPack(tmp_path / "out" / "levir.h5") as packed:
        split = next(s for s in ("train", "val", "test") if packed.num_samples(s))
        past = packed.read(split, [0])[0][0]
    np.testing.assert_array_equal(past, np.dstack([(grey >> 8).astype(np.uint8)] * 3))


@pytest.mark.parametrize("mode, values", [("F", np.linspace(0, 1, 16, dtype=np.float32)),
                                          ("I", np.arange(16, dtype=np.int32) * 100_000)])
def test_float_and_32_bit_images_are_refused_in_one_line(tmp_path, mode, values):
    path = tmp_path / "deep.tif"
    Image.fromarray(values.reshape(4, 4), mode).save(path)
    for read in (images.read_rgb, images.read_binary_mask):
        with pytest.raises(DataError, match=r"deep\.tif: pixels are .*; nfed needs 8-bit images"):
            read(path)


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "CMYK"])
def test_8_bit_modes_convert_as_pillow_converts_them(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    image.save(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    np.testing.assert_array_equal(images.read_rgb(path), np.asarray(image.convert("RGB")))


# --------------------------------------------------------------------------------- GeoTIFF output, disk full

@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` of any file fail with EFBIG (as on a full disk) until the block ends."""
    resource = pytest.importorskip("resource", reason="needs POSIX resource limits")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < nbytes:
        pytest.skip("the file size limit is already lower")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # EFBIG instead of the signal's default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_geotiff_mask_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    rasterio = pytest.importorskip("rasterio", reason="rasterio not installed (pip install 'nfed[geo]')")
    from test_geo import write_geotiff
    from test_predict_outputs import balanced_model, image_pair

    from nfed.model.checkpoint import save_checkpoint

    past, current = image_pair(128, 128, seed=3)
    model = balanced_model(2, past, current)
    checkpoint = save_checkpoint(tmp_path / "model.h5", model.state_dict(),
                                 config={"width": 4, "classes": 2, "lambda_rec": 0.0, "tile": TILE})
    args = ["predict", "--model", checkpoint, "--past", write_geotiff(tmp_path / "A" / "s.tif", past),
            "--current", write_geotiff(tmp_path / "B" / "s.tif", current), "--quiet", "--out"]
    code, output = run(*args, tmp_path / "ok" / "m.tif")
    assert code == 0 and "wrote" in output, output
    complete = (tmp_path / "ok" / "m.tif").stat().st_size
    with rasterio.open(tmp_path / "ok" / "m.tif") as written:
        assert written.read(1).shape == (128, 128)
    (tmp_path / "full").mkdir()
    with file_size_limit(complete // 2):
        code, output = run(*args, tmp_path / "full" / "m.tif")
    assert_one_line_error(code, output, f"{tmp_path / 'full' / 'm.tif'}: cannot write (")
    assert "wrote" not in output
    assert list((tmp_path / "full").iterdir()) == []             # neither the mask nor its temporary file
