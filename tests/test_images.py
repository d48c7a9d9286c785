"""nfed.data.images: decoding with one-line errors, the fast PNG encoder, grid tiling, the tile -> model input
conversion, and the image listing shared by `nfed pack` and `nfed predict`."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nfed.common.errors import DataError
from nfed.data import images
from nfed.training.predict import find_pairs


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (64, 64, 3), (33, 80, 3)])
def test_encoded_png_decodes_to_the_same_pixels(shape):
    rgb = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    for level in (1, 9):
        with Image.open(io.BytesIO(images.encode_png(rgb, level))) as decoded:
            assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
            np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_readers_convert_modes_and_threshold_labels(tmp_path):
    grey = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([grey, grey, grey, grey]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(images.read_rgb(tmp_path / "grey.png"), np.dstack([grey] * 3))
    np.testing.assert_array_equal(images.read_rgb(tmp_path / "rgba.png"), np.dstack([grey] * 3))
    np.testing.assert_array_equal(images.read_binary_mask(tmp_path / "grey.png"), (grey >= 128).astype(np.uint8))
    assert images.image_size(tmp_path / "rgba.png") == (4, 4)


@pytest.mark.parametrize("read", [images.read_rgb, images.read_binary_mask, images.image_size])
def test_unreadable_images_are_one_data_error_naming_the_file(tmp_path, read):
    with pytest.raises(DataError, match=r"missing\.png: file not found"):
        read(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        read(tmp_path / "broken.png")


def test_tiles_drop_remainders_pad_small_images_and_name_their_origin():
    image = np.arange(70 * 45 * 3, dtype=np.int64).reshape(45, 70, 3)   # 45 rows, 70 columns
    origins = images.tile_origins(70, 45, 32)
    assert origins == [(0, 0), (0, 32)]
    tiles = images.cut_tiles(image, 32, origins)
    np.testing.assert_array_equal(tiles[1], image[:32, 32:64])
    assert images.tile_ids("pair", 70, 45, 32, origins) == ["pair_y0000_x0000", "pair_y0000_x0032"]
    assert images.tile_ids("pair", 32, 32, 32, [(0, 0)]) == ["pair"]
    small = image[:20, :10, 0]
    (padded,) = images.cut_tiles(small, 32, images.tile_origins(10, 20, 32))
    assert padded.shape == (32, 32) and not padded[20:].any() and not padded[:, 10:].any()
    np.testing.assert_array_equal(padded[:20, :10], small)


def test_model_input_is_nchw_float32_in_unit_range():
    tiles = np.random.default_rng(1).integers(0, 256, (3, 8, 5, 3), dtype=np.uint8)
    out = images.images_to_nchw_float(tiles)
    assert out.dtype == np.float32 and out.shape == (3, 3, 8, 5)
    np.testing.assert_allclose(out, tiles.astype(np.float64).transpose(0, 3, 1, 2) / 255, rtol=0, atol=1e-7)


def test_image_listing_skips_hidden_files_folders_and_other_suffixes(tmp_path):
    for folder in ("A", "B"):
        (tmp_path / folder).mkdir()
        for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt"):
            (tmp_path / folder / name).write_bytes(b"")
        (tmp_path / folder / "folder.png").mkdir()
    assert [p.name for p in images.list_images(tmp_path / "A")] == ["a.jpg", "b.PNG"]
    assert images.list_images(tmp_path / "missing") == []
    assert [(a.name, b.parent.name) for a, b in find_pairs(tmp_path)] == [("a.jpg", "B"), ("b.PNG", "B")]
