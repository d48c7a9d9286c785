"""Where `nfed pack`'s inputs come from: the source format detected, its pairs discovered as Items, checked
from their headers and decoded.

Three source formats:
- JSON-labelled pairs (the study's format, also what `nfed synth` writes): any number of `*.json` labels
  under SRC (data/label_schema.json), each naming its past/current PNGs beside it; the district comes from
  the label. Masks are rasterised from the polygons with the change type as value (1..4).
- LEVIR-CD folders: SRC/A (past), SRC/B (current), SRC/label (0/255, >=128 = change) with the same file
  stems; or one such folder per district, SRC/<district>/A|B|label. District = sub-folder name, else SRC's
  name, or from a --district-map CSV (file stem -> district). Masks are binary (1 = change).
- GeoTIFF pairs with GeoJSON labels: the LEVIR layout with label/<stem>.geojson, read by window
  (nfed.data.geopack, optional extra nfed[geo]).

Problems visible from names alone come back as (name, message) pairs so the packer can stop or skip them;
messages name files relative to SRC's parent.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nfed.common.errors import DataError
from nfed.data.geopack import LABEL_SUFFIXES, check_geotiff_item, is_geotiff_folder, load_geotiff_item
from nfed.data.images import IMAGE_SUFFIXES, image_size, list_images, read_binary_mask, read_rgb
from nfed.data.labels import rasterise, read_label


@dataclass
class Item:
    """One source pair (an image pair with its label) that yields one or more tiles."""

    district: str
    name: str                     # shown in messages and in the skipped list (a path relative to SRC)
    tile_id: str                  # id of the pair (tiles of a cut image get suffixes)
    past: Path
    current: Path
    label: Path | None            # JSON label, LEVIR mask or GeoJSON
    kind: str                     # "json" | "levir" | "geotiff"
    size: tuple[int, int] = (0, 0)  # (width, height), known after check()
    json_label: object = None


def detect_format(src: Path) -> str:
    """'geotiff' for GeoTIFFs with GeoJSON labels (nfed.data.geopack), 'levir' when SRC (or its sub-folders) holds
    A/ and B/, else 'json' when *.json labels exist."""
    if is_geotiff_folder(src):
        return "geotiff"
    if (src / "A").is_dir() and (src / "B").is_dir():
        return "levir"
    if any((sub / "A").is_dir() and (sub / "B").is_dir() for sub in _subdirs(src)):
        return "levir"
    if any(src.rglob("*.json")):
        return "json"
    raise DataError(f"{src}: neither a LEVIR-CD folder (A/, B/, label/) nor a folder of *.json labels")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_by_stem(folder: Path, suffixes=IMAGE_SUFFIXES) -> dict[str, Path]:
    return {path.stem: path for path in list_images(folder, suffixes)}


def read_district_map(path: Path) -> dict[str, str]:
    """CSV with columns stem,district (a header row is optional)."""
    mapping: dict[str, str] = {}
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            for line, row in enumerate(csv.reader(handle), start=1):
                if not row or row[0].strip().startswith("#"):
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}: line {line}: expected 'stem,district'")
                stem, district = row[0].strip(), row[1].strip()
                if line == 1 and stem.lower() in ("stem", "file", "name", "tile"):
                    continue
                mapping[stem] = district
    except FileNotFoundError:
        raise DataError(f"{path}: district map not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read district map ({exc})") from None
    if not mapping:
        raise DataError(f"{path}: district map is empty")
    return mapping


def _relative(path: Path, src: Path) -> str:
    try:
        return str(path.relative_to(src.parent))
    except ValueError:
        return str(path)


def discover_levir(src: Path, district_map: dict[str, str] | None, kind: str = "levir"
                   ) -> tuple[list[Item], list[str]]:
    """Items of a LEVIR folder (kind "geotiff": GeoJSON labels); problems found by file name only (missing
    partner files) come back as (name, message) strings so the caller can raise or skip them."""
    if not (src / "A").is_dir() and not any((sub / "A").is_dir() for sub in _subdirs(src)):
        raise DataError(f"{src}: not a LEVIR-CD folder (no A/ folder, nor sub-folders with A/)")
    folders = [(src, src.name)] if (src / "A").is_dir() else [(sub, sub.name) for sub in _subdirs(src)
                                                               if (sub / "A").is_dir() or (sub / "B").is_dir()]
    items, problems = [], []
    for folder, folder_district in folders:
        past, current = _images_by_stem(folder / "A"), _images_by_stem(folder / "B")
        label = _images_by_stem(folder / "label", LABEL_SUFFIXES if kind == "geotiff" else IMAGE_SUFFIXES)
        stems = sorted(set(past) | set(current) | set(label))
        if not stems:
            problems.append((_relative(folder, src), f"{_relative(folder, src)}: empty district "
                                                     f"(no images in A/, B/, label/)"))
            continue
        for stem in stems:
            name = _relative(past.get(stem, folder / "A" / stem), src)
            missing = [f"{sub}/{stem}.*" for sub, found in (("A", past), ("B", current), ("label", label))
                       if stem not in found]
            if missing:
                message = f"{name}: pair '{stem}' is missing {', '.join(missing)}"
                if stem in past and stem in current:
                    message += _size_note(past[stem], current[stem])
                problems.append((name, message))
                continue
            district = folder_district
            if district_map is not None:
                if stem not in district_map:
                    problems.append((name, f"{name}: stem '{stem}' is not in the district map"))
                    continue
                district = district_map[stem]
            items.append(Item(district=district, name=name, tile_id=stem, past=past[stem],
                              current=current[stem], label=label[stem], kind=kind))
    return items, problems


def _size_note(past: Path, current: Path) -> str:
    """'; sizes differ (...)' when the header sizes of a pair disagree, for fuller messages."""
    try:
        sizes = image_size(past), image_size(current)
    except DataError:
        return ""
    if sizes[0] == sizes[1]:
        return ""
    return f"; sizes differ (past {sizes[0][0]}x{sizes[0][1]}, current {sizes[1][0]}x{sizes[1][1]})"


def discover_json(src: Path, exclude: Path | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a folder of JSON labels (validated here: schema errors come back as problems).
    `exclude` (the output folder, when it lies inside SRC) is not searched."""
    labels = sorted(p for p in src.rglob("*.json") if not any(part.startswith(".")
                                                               for part in p.relative_to(src).parts))
    problems = []
    subfolders = [sub for sub in _subdirs(src) if exclude is None or sub.resolve() != exclude]
    if any(p.parent != src for p in labels):  # district-per-folder layout: every folder must hold labels
        for sub in subfolders:
            if not any(sub.rglob("*.json")):
                problems.append((_relative(sub, src), f"{_relative(sub, src)}: empty district "
                                                      "(no *.json labels)"))
    if not labels:
        raise DataError(f"{src}: no *.json labels found")
    items = []
    for path in labels:
        name = _relative(path, src)
        try:
            label = read_label(path)
        except DataError as exc:
            problems.append((name, _shorten(str(exc), path, name)))
            continue
        items.append(Item(district=label.district, name=name, tile_id=label.tile_id, past=label.past,
                          current=label.current, label=path, kind="json", json_label=label))
    return items, problems


def _shorten(message: str, path: Path, name: str) -> str:
    return name + message[len(str(path)):] if message.startswith(str(path)) else message


def check_item(item: Item, src: Path, max_pixels: int | None = None) -> None:
    """Cheap checks from image headers: files exist and are images of at most `max_pixels` (GeoTIFFs are read
    by window, so any size), past/current/label sizes agree."""
    if item.kind == "geotiff":
        return check_geotiff_item(item)
    sizes = {}
    for role, path in (("past", item.past), ("current", item.current), ("label", item.label)):
        if role == "label" and item.kind == "json":
            continue
        try:
            sizes[role] = image_size(path, max_pixels)
        except DataError as exc:
            raise DataError(_shorten(str(exc), path, _relative(path, src))) from None
    if item.kind == "json":
        sizes["label"] = (item.json_label.width, item.json_label.height)
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{role} {w}x{h}" for role, (w, h) in sizes.items())
        raise DataError(f"{item.name}: sizes differ ({shown})")
    item.size = sizes["past"]


def load_item(item: Item, src: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one pair: past, current [H,W,3] uint8 and mask [H,W] uint8 (GeoTIFFs: views read by window).
    Images decode only up to the size their headers had when checked (a file swapped since is refused)."""
    if item.kind == "geotiff":
        return load_geotiff_item(item)
    max_pixels = item.size[0] * item.size[1] or None
    try:
        past, current = read_rgb(item.past, max_pixels), read_rgb(item.current, max_pixels)
        mask = rasterise(item.json_label) if item.kind == "json" else read_binary_mask(item.label, max_pixels)
    except DataError as exc:
        message = str(exc)
        for path in (item.past, item.current, item.label):
            message = _shorten(message, path, _relative(path, src))
        raise DataError(message) from None
    if not (past.shape[:2] == current.shape[:2] == mask.shape):
        raise DataError(f"{item.name}: decoded sizes differ (past {past.shape[1]}x{past.shape[0]}, "
                        f"current {current.shape[1]}x{current.shape[0]}, label {mask.shape[1]}x{mask.shape[0]})")
    return past, current, mask
