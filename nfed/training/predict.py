"""Change masks for image pairs of any size: pad to whole model tiles, predict band by band, stitch back.

The model was trained on square tiles (its checkpoint records the tile size); an image pair is padded at the
bottom/right by mirroring to a multiple of that tile and predicted in bands of whole tile rows, each read from
its source only when needed (a GeoTIFF is read by window, nfed.data.geo), cut into tiles and predicted in batches
with the U-Encoder. Masks are written as 0/255 greyscale PNGs, or GeoTIFFs with the input's georeference.
On request the change regions also become polygons (GeoJSON, nfed label JSON) and an overlay PNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from nfed.common import backend
from nfed.common.atomic import atomic_path
from nfed.common.errors import ConfigError, DataError
from nfed.data.images import RASTER_SUFFIXES, image_size, images_to_nchw_float, list_images, read_rgb
from nfed.data.polygons import DEFAULT_MIN_AREA, DEFAULT_SIMPLIFY

MASK_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
OVERLAY_MAX_SIDE = 4096

RowReader = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class OutputOptions:
    """What `predict_files` writes beside the mask (polygons and overlay need shapely: nfed[geo])."""

    polygons: bool = False
    overlay: bool = False
    min_area: int = DEFAULT_MIN_AREA
    simplify: float = DEFAULT_SIMPLIFY
    district: str = "unassigned"


def predict_bands(model, read_rows: RowReader, height: int, width: int, tile: int, *, device="cpu",
                  batch_size: int = 8) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first row, class map [rows, W] uint8, P(change) [rows, W] float32) band by band, top down.

    `read_rows(start, stop)` returns the past and current rows [start, stop) as [rows, W, 3] uint8. The
    mirror padding equals padding the whole image: the last band reads back far enough to mirror from.
    """
    if tile < 16 or tile % 16:
        raise DataError(f"model tile {tile} must be a positive multiple of 16")
    rows, cols = -(-height // tile), -(-width // tile)
    tile_rows_per_band = max(1, batch_size // cols)
    col_pad = cols * tile - width
    for first_tile_row in range(0, rows, tile_rows_per_band):
        y0 = first_tile_row * tile
        y1 = min(height, y0 + tile_rows_per_band * tile)
        band_height = min(rows * tile, y0 + tile_rows_per_band * tile) - y0
        row_pad = y0 + band_height - y1
        start = max(0, min(y0, height - row_pad))
        pair = [np.pad(image, ((0, row_pad), (0, col_pad), (0, 0)), mode="symmetric")[y0 - start:]
                for image in read_rows(start, height if row_pad else y1)]
        classes, change = _predict_band(model, pair, tile, device, batch_size)
        yield y0, classes[:y1 - y0, :width], change[:y1 - y0, :width]


def _predict_band(model, pair, tile: int, device, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    band_height, band_width = pair[0].shape[:2]
    origins = [(y, x) for y in range(0, band_height, tile) for x in range(0, band_width, tile)]
    classes = np.zeros((band_height, band_width), np.uint8)
    change = np.zeros((band_height, band_width), np.float32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        inputs = [backend.to_device(_tiles_nchw(image, chunk, tile), device) for image in pair]
        logits = model.change_logits(*inputs)
        tile_classes, tile_change = (backend.to_numpy(a) for a in _classes_and_change(logits))
        for (y, x), c, p in zip(chunk, tile_classes, tile_change):
            classes[y:y + tile, x:x + tile] = c
            change[y:y + tile, x:x + tile] = p
    return classes, change


def _classes_and_change(logits):
    """argmax class [N, H, W] and P(change) = 1 - softmax(logits)[:, 0], computed stably on the device."""
    xp = backend.array_module(logits)
    shifted = xp.exp(logits - logits.max(axis=1, keepdims=True))
    change = 1 - shifted[:, 0] / shifted.sum(axis=1)
    return logits.argmax(axis=1).astype(xp.uint8), change.astype(xp.float32)


def predict_arrays(model, past: np.ndarray, current: np.ndarray, tile: int, *, device="cpu",
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(class map [H, W] uint8, P(change) [H, W] float32) for one pair of [H, W, 3] uint8 images."""
    if past.shape != current.shape:
        raise DataError(f"past {past.shape[1]}x{past.shape[0]} and current {current.shape[1]}x{current.shape[0]} "
                        "differ in size")
    pair = ArrayPair(past, current)
    return _assemble(predict_bands(model, pair.read_rows, pair.height, pair.width, tile, device=device,
                                   batch_size=batch_size), pair.height, pair.width)


def predict_change(model, past: np.ndarray, current: np.ndarray, tile: int, *, device="cpu",
                   batch_size: int = 8) -> np.ndarray:
    """Class map [H, W] (uint8; > 0 = change) for one pair of [H, W, 3] uint8 images of equal size."""
    return predict_arrays(model, past, current, tile, device=device, batch_size=batch_size)[0]


def _assemble(bands, height: int, width: int, on_band=None) -> tuple[np.ndarray, np.ndarray]:
    classes = np.zeros((height, width), np.uint8)
    change = np.zeros((height, width), np.float32)
    for y0, band_classes, band_change in bands:
        classes[y0:y0 + len(band_classes)] = band_classes
        change[y0:y0 + len(band_change)] = band_change
        if on_band is not None:
            on_band(y0, band_classes)
    return classes, change


class ArrayPair:
    """An image pair held in memory (PNG, JPEG, ...): rows by slicing; no georeference."""

    georeference = None

    def __init__(self, past: np.ndarray, current: np.ndarray):
        self.past, self.current = past, current
        self.height, self.width = past.shape[:2]

    @classmethod
    def from_files(cls, past_path: Path, current_path: Path) -> "ArrayPair":
        return cls(read_rgb(Path(past_path)), read_rgb(Path(current_path)))

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.past[start:stop], self.current[start:stop]

    def current_preview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The current image shrunk to at most max_side pixels a side, and the scale applied."""
        scale = min(1.0, max_side / max(self.height, self.width))
        if scale == 1.0:
            return self.current, 1.0
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        return np.asarray(Image.fromarray(self.current).resize(size, Image.Resampling.BOX)), scale

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def uses_raster_reader(path: Path) -> bool:
    """TIFFs are read by window through rasterio when it is installed (nfed[geo]); other images by Pillow."""
    from nfed.data.geo import rasterio_available

    return Path(path).suffix.lower() in RASTER_SUFFIXES and rasterio_available()


def open_pair(past_path: Path, current_path: Path):
    """The pair as a RasterPair (GeoTIFFs, read by window) or an ArrayPair (decoded in memory)."""
    if uses_raster_reader(past_path) and uses_raster_reader(current_path):
        from nfed.data.geo import RasterPair

        return RasterPair(past_path, current_path)
    return ArrayPair.from_files(past_path, current_path)


def predict_files(model, past_path: Path, current_path: Path, out_path: Path, tile: int, *, device="cpu",
                  batch_size: int = 8, outputs: OutputOptions = OutputOptions(), source: str = "nfed predict") -> dict:
    """Predict one pair of image files and write the mask (and the requested outputs) atomically.

    The mask is a 0/255 PNG, or a GeoTIFF (written band by band) when `out_path` ends in .tif/.tiff.
    Returns a summary: sizes, changed fraction, files written and, with polygons, per-type summary rows.
    """
    check_pair_sizes(past_path, current_path)
    out_path = Path(out_path)
    mask_format(out_path)
    raster_mask = out_path.suffix.lower() in RASTER_SUFFIXES
    if raster_mask:
        from nfed.data.geo import mask_raster_writer, require_rasterio

        require_rasterio()                  # before any work, not after it
    with open_pair(past_path, current_path) as pair:
        bands = predict_bands(model, pair.read_rows, pair.height, pair.width, tile, device=device,
                              batch_size=batch_size)
        if raster_mask:
            with mask_raster_writer(out_path, pair) as write_rows:
                classes, change = _assemble(bands, pair.height, pair.width, on_band=write_rows)
        else:
            classes, change = _assemble(bands, pair.height, pair.width)
            write_mask(out_path, classes > 0)
        summary = {"past": str(past_path), "current": str(current_path), "mask": str(out_path),
                   "height": int(classes.shape[0]), "width": int(classes.shape[1]),
                   "changed_fraction": float((classes > 0).mean()), "files": [str(out_path)], "rows": []}
        if outputs.polygons or outputs.overlay:
            extra = _write_vectors(model, pair, classes, change, past_path, current_path, out_path, outputs, source)
            summary.update(extra, files=summary["files"] + extra["files"])
    return summary


def _write_vectors(model, pair, classes, change, past_path, current_path, out_path: Path,
                   outputs: OutputOptions, source: str) -> dict:
    """Polygons (GeoJSON + label JSON) and/or the overlay of one predicted pair: files, regions, summary rows."""
    from nfed.data import vectors
    from nfed.data.overlay import render_overlay, write_overlay
    from nfed.data.polygons import change_regions

    regions = change_regions(classes, change, typed=model.classes > 2, min_area=outputs.min_area,
                             simplify=outputs.simplify)
    georeference, files = pair.georeference, []
    if outputs.polygons:
        geojson_path, label_path = out_path.with_suffix(".geojson"), out_path.with_suffix(".json")
        vectors.write_geojson(geojson_path, vectors.geojson_document(
            regions, name=out_path.stem, georeference=georeference,
            extra={"past": str(past_path), "current": str(current_path), "min_area_px": outputs.min_area,
                   "simplify_px": outputs.simplify}))
        vectors.write_label_json(label_path, vectors.label_json_document(
            regions, label_path=label_path, past=Path(past_path), current=Path(current_path), width=pair.width,
            height=pair.height, district=outputs.district,
            source=f"{source}, min area {outputs.min_area} px, simplify {outputs.simplify} px"))
        files += [str(geojson_path), str(label_path)]
    if outputs.overlay:
        overlay_path = out_path.with_name(out_path.stem + "_overlay.png")
        preview, scale = pair.current_preview(OVERLAY_MAX_SIDE)
        write_overlay(overlay_path, render_overlay(preview, regions, scale=scale, typed=model.classes > 2))
        files.append(str(overlay_path))
    pixel_area = georeference.pixel_area if georeference else 1.0
    return {"files": files, "regions": len(regions),
            "rows": vectors.summary_rows(out_path.stem, regions, pixel_area)}


def mask_name(past_path: Path) -> str:
    """File name of the mask predicted for a pair: GeoTIFF for raster input, else PNG."""
    suffix = ".tif" if uses_raster_reader(past_path) else ".png"
    return Path(past_path).with_suffix(suffix).name


def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(A/name, B/name) for every image of a LEVIR-style folder; DataError when the layout is broken."""
    folder = Path(folder)
    a_dir, b_dir = folder / "A", folder / "B"
    if not a_dir.is_dir() or not b_dir.is_dir():
        raise DataError(f"{folder}: not a pair folder (needs A/ with past and B/ with current images)")
    a_files, b_files = ({path.name: path for path in list_images(folder)} for folder in (a_dir, b_dir))
    if not a_files:
        raise DataError(f"{a_dir}: no images")
    unpaired = sorted(set(a_files) ^ set(b_files))
    if unpaired:
        side = "B" if unpaired[0] in a_files else "A"
        raise DataError(f"{folder}: {unpaired[0]} has no counterpart in {side}/ ({len(unpaired)} unpaired)")
    return [(a_files[name], b_files[name]) for name in sorted(a_files)]


def check_pair_sizes(past_path: Path, current_path: Path) -> None:
    """DataError naming both files when the two dates differ in size (read from the headers only)."""
    past_size, current_size = _header_size(Path(past_path)), _header_size(Path(current_path))
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


def _header_size(path: Path) -> tuple[int, int]:
    if uses_raster_reader(path):
        from nfed.data.geo import raster_size

        return raster_size(path)
    return image_size(path)


def write_mask(path: str | os.PathLike, change: np.ndarray) -> None:
    """Write a boolean change map as an 8-bit greyscale image (format from the name): 255 = change, 0 = none."""
    fmt = mask_format(path)
    image = Image.fromarray(np.where(change, 255, 0).astype(np.uint8))
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def _tiles_nchw(image: np.ndarray, origins, tile: int) -> np.ndarray:
    """Crops [B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [0, 1], scaled exactly as the pack reader does."""
    return images_to_nchw_float(np.stack([image[y:y + tile, x:x + tile] for y, x in origins]))


def predict_pairs(model_path: Path, pairs: list[tuple[Path, Path, Path]], *, device, batch_size: int,
                  outputs: OutputOptions | None = None, show_progress: bool = True) -> list[dict]:
    """`nfed predict`'s job: (past, current, mask path) triples through one checkpoint, one summary each.

    Every pair's sizes and every output name are checked before the model is loaded, so a bad last pair
    costs no work."""
    from nfed.common.progress import progress
    from nfed.training.trainer import checkpoint_tile, model_from_checkpoint

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    for past_path, current_path, target in pairs:
        check_pair_sizes(past_path, current_path)
        mask_format(target)
    model, checkpoint = model_from_checkpoint(model_path, device=device)
    tile = checkpoint_tile(checkpoint, model_path)
    return [predict_files(model, past_path, current_path, target, tile, device=device, batch_size=batch_size,
                          outputs=outputs, source=f"nfed predict --model {model_path}")
            for past_path, current_path, target in progress(pairs, label="predicting", length=len(pairs),
                                                            enabled=show_progress and len(pairs) > 1)]


def write_change_summary(summaries: list[dict], out_path: Path, single: bool) -> Path | None:
    """<mask stem>_changes.csv (one pair) or OUT/changes.csv (a folder): image, type, count, pixels, area."""
    from nfed.data.vectors import write_summary_csv

    if not any("regions" in summary for summary in summaries):
        return None
    target = out_path.with_name(out_path.stem + "_changes.csv") if single else out_path / "changes.csv"
    write_summary_csv(target, [row for summary in summaries for row in summary["rows"]])
    return target
