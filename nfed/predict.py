"""Change masks for image pairs of any size: pad to whole model tiles, predict tile by tile, stitch back.

The model was trained on square tiles (its checkpoint records the tile size); an image pair is padded at the
bottom/right by mirroring to a multiple of that tile, cut into tiles, predicted in batches with the U-Encoder
and the stitched mask is cropped back to the image size. Masks are written as 0/255 greyscale PNGs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import backend
from .atomic import atomic_path
from .data import images_to_nchw_float as to_nchw_float
from .errors import ConfigError, DataError
from .pack import image_size, read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


def predict_change(model, past: np.ndarray, current: np.ndarray, tile: int, *, device="cpu",
                   batch_size: int = 8) -> np.ndarray:
    """Class map [H, W] (uint8; > 0 = change) for one pair of [H, W, 3] uint8 images of equal size."""
    if past.shape != current.shape:
        raise DataError(f"past {past.shape[1]}x{past.shape[0]} and current {current.shape[1]}x{current.shape[0]} "
                        "differ in size")
    if tile < 16 or tile % 16:
        raise DataError(f"model tile {tile} must be a positive multiple of 16")
    height, width = past.shape[:2]
    rows, cols = -(-height // tile), -(-width // tile)
    pad = ((0, rows * tile - height), (0, cols * tile - width), (0, 0))
    padded = [np.pad(image, pad, mode="symmetric") for image in (past, current)]
    origins = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
    out = np.zeros((rows * tile, cols * tile), np.uint8)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        pair = [backend.to_device(_tiles_nchw(image, chunk, tile), device) for image in padded]
        classes = backend.to_numpy(model.predict(*pair))
        for (y, x), tile_classes in zip(chunk, classes):
            out[y:y + tile, x:x + tile] = tile_classes
    return out[:height, :width]


def predict_files(model, past_path: Path, current_path: Path, out_path: Path, tile: int, *, device="cpu",
                  batch_size: int = 8) -> dict:
    """Predict one pair of image files and write the 0/255 mask PNG atomically; returns a small summary."""
    check_pair_sizes(past_path, current_path)
    past, current = read_rgb(Path(past_path)), read_rgb(Path(current_path))
    classes = predict_change(model, past, current, tile, device=device, batch_size=batch_size)
    write_mask(out_path, classes > 0)
    return {"past": str(past_path), "current": str(current_path), "mask": str(out_path),
            "height": int(classes.shape[0]), "width": int(classes.shape[1]),
            "changed_fraction": float((classes > 0).mean())}


def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(A/name, B/name) for every image of a LEVIR-style folder; DataError when the layout is broken."""
    folder = Path(folder)
    a_dir, b_dir = folder / "A", folder / "B"
    if not a_dir.is_dir() or not b_dir.is_dir():
        raise DataError(f"{folder}: not a pair folder (needs A/ with past and B/ with current images)")
    a_files = {p.name: p for p in sorted(a_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    b_files = {p.name: p for p in sorted(b_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not a_files:
        raise DataError(f"{a_dir}: no images")
    unpaired = sorted(set(a_files) ^ set(b_files))
    if unpaired:
        side = "B" if unpaired[0] in a_files else "A"
        raise DataError(f"{folder}: {unpaired[0]} has no counterpart in {side}/ ({len(unpaired)} unpaired)")
    return [(a_files[name], b_files[name]) for name in sorted(a_files)]


def check_pair_sizes(past_path: Path, current_path: Path) -> None:
    """DataError naming both files when the two dates differ in size (read from the headers only)."""
    past_size, current_size = image_size(Path(past_path)), image_size(Path(current_path))
    if past_size != current_size:
        raise DataError(f"{past_path} is {past_size[0]}x{past_size[1]} but {current_path} is "
                        f"{current_size[0]}x{current_size[1]}: the two dates must have the same size")


def mask_format(path: str | os.PathLike) -> str:
    """The lossless image format a mask file name asks for (PNG, TIFF, BMP); ConfigError for anything else
    (JPEG would blur the 0/255 mask, and PNG bytes under a .jpg name mislead every reader)."""
    fmt = MASK_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {path}: masks are written as {', '.join(sorted(MASK_FORMATS))} "
                          "(lossless); give a file name with one of these extensions")
    return fmt


def write_mask(path: str | os.PathLike, change: np.ndarray) -> None:
    """Write a boolean change map as an 8-bit greyscale image (format from the name): 255 = change, 0 = none."""
    fmt = mask_format(path)
    image = Image.fromarray(np.where(change, 255, 0).astype(np.uint8))
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def _tiles_nchw(image: np.ndarray, origins, tile: int) -> np.ndarray:
    """Crops [B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [0, 1], scaled exactly as the pack reader does."""
    return to_nchw_float(np.stack([image[y:y + tile, x:x + tile] for y, x in origins]))
