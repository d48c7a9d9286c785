"""Ingest of raw change-detection pairs into one HDF5 pack per district (the format nfed.data.reader reads).

Three source formats:
- JSON-labelled pairs (the study's format, also what `nfed synth` writes): any number of `*.json` labels
  under SRC (data/label_schema.json), each naming its past/current PNGs beside it; the district comes from
  the label. Masks are rasterised from the polygons with the change type as value (1..4).
- LEVIR-CD folders: SRC/A (past), SRC/B (current), SRC/label (0/255, >=128 = change) with the same file
  stems; or one such folder per district, SRC/<district>/A|B|label. District = sub-folder name, else SRC's
  name, or from a --district-map CSV (file stem -> district). Masks are binary (1 = change).
- GeoTIFF pairs with GeoJSON labels: the LEVIR layout with label/<stem>.geojson, read by window
  (nfed.data.geopack, optional extra nfed[geo]).

Images of any size are cut on a grid of tile x tile from the top-left corner; a remainder narrower than a
tile at the right or bottom edge is dropped, and an image smaller than one tile is zero-padded (mask 0).
Splits come from the labels when every label of a district names one (`split`, e.g. `nfed synth`'s fixed
evaluation tiles); otherwise they are drawn per district by a seeded permutation: of source images when the
district has at least 3 of them (so tiles of one image never straddle train and test), else of tiles.
Every pack is written to a temporary file and renamed at the end, so an interrupted pack leaves no file
that looks valid.
"""
from __future__ import annotations

import csv
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np
from PIL import Image

from nfed import __version__
from nfed.data.districts import district_order_key
from nfed.common.errors import ConfigError, DataError
from nfed.data.geopack import LABEL_SUFFIXES, check_geotiff_item, is_geotiff_folder, labels_typed, load_geotiff_item
from nfed.common.h5write import create_h5, raise_if_failed
from nfed.data.labels import CHANGE_TYPES, rasterise, read_label
from nfed.common.validate import check_number

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_LEVIR_TILE = 256
MASK_VALUES_TYPED = "0=none," + ",".join(f"{code}={name}" for code, name in enumerate(CHANGE_TYPES, 1))
MASK_VALUES_BINARY = "0=none,1=change"
_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]*$")


# ----------------------------------------------------------------------------------------------- writer

class PackWriter:
    """Append tiles split by split into `<path>` (HDF5, format of ARCHITECTURE.md), atomically.

    Use as a context manager; the file appears under its final name only when the block ends without an
    exception. Datasets are chunked per tile and gzip-compressed, so readers fetch single tiles cheaply.
    Tiles are buffered and written BLOCK at a time.
    """

    BLOCK = 64

    def __init__(self, path: str | Path, *, district: str, tile: int, source: str, split_seed: int,
                 mask_values: str = MASK_VALUES_TYPED, compression_level: int = 1,
                 extra_attrs: dict | None = None):
        self.path = Path(path)
        self.district = district
        self.tile = int(tile)
        self.attrs = {"district": district, "tile_size": self.tile, "source": source,
                      "split_seed": int(split_seed), "nfed_version": __version__,
                      "format_version": FORMAT_VERSION, "mask_values": mask_values,
                      **(extra_attrs or {})}
        self.compression_level = compression_level
        self._writer = None
        self._file: h5py.File | None = None
        self.counts = {split: 0 for split in SPLITS}
        self._buffers: dict[str, list] = {split: [] for split in SPLITS}

    def __enter__(self) -> "PackWriter":
        self._writer = create_h5(self.path)
        self._file = self._writer.__enter__()
        for key, value in self.attrs.items():
            self._file.attrs[key] = value
        t = self.tile
        for split in SPLITS:
            group = self._file.create_group(split)
            options = {"compression": "gzip", "compression_opts": self.compression_level}
            group.create_dataset("past", shape=(0, t, t, 3), maxshape=(None, t, t, 3), dtype=np.uint8,
                                 chunks=(1, t, t, 3), **options)
            group.create_dataset("current", shape=(0, t, t, 3), maxshape=(None, t, t, 3), dtype=np.uint8,
                                 chunks=(1, t, t, 3), **options)
            group.create_dataset("mask", shape=(0, t, t), maxshape=(None, t, t), dtype=np.uint8,
                                 chunks=(1, t, t), **options)
            group.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                                 chunks=(256,))
        return self

    def append(self, split: str, tile_id: str, past: np.ndarray, current: np.ndarray,
               mask: np.ndarray) -> None:
        """Add one tile (past/current [T,T,3] uint8, mask [T,T] uint8) to a split."""
        t = self.tile
        if past.shape != (t, t, 3) or current.shape != (t, t, 3) or mask.shape != (t, t):
            raise DataError(f"{tile_id}: tile shapes {past.shape}, {current.shape}, {mask.shape} "
                            f"do not match the pack's tile size {t}")
        if split not in self._buffers:
            raise DataError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
        buffer = self._buffers[split]
        buffer.append((tile_id, np.asarray(past, np.uint8), np.asarray(current, np.uint8),
                       np.asarray(mask, np.uint8)))
        self.counts[split] += 1
        if len(buffer) >= self.BLOCK:
            self._flush(split)

    def _flush(self, split: str) -> None:
        """Write buffered tiles of a split in one resize (h5py resizes per tile are slow)."""
        buffer = self._buffers[split]
        if not buffer:
            return
        group = self._file[split]
        start = group["ids"].shape[0]
        stop = start + len(buffer)
        for position, name in enumerate(("ids", "past", "current", "mask"), start=0):
            dataset = group[name]
            dataset.resize(stop, axis=0)
            if name == "ids":
                dataset[start:stop] = [entry[0] for entry in buffer]
            else:
                dataset[start:stop] = np.stack([entry[position] for entry in buffer])
        buffer.clear()
        raise_if_failed(self._file, self.path)   # a full disk stops the pack at once

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                for split in SPLITS:
                    self._flush(split)
                self._file.attrs["num_samples"] = np.array([self.counts[s] for s in SPLITS], np.int64)
            except BaseException as error:
                if not self._writer.__exit__(type(error), error, error.__traceback__):
                    raise
                return False
        return self._writer.__exit__(exc_type, exc, tb)


def write_pack(path: str | Path, district: str, splits: dict[str, tuple], *, source: str = "arrays",
               split_seed: int = 0, mask_values: str = MASK_VALUES_TYPED) -> Path:
    """Write a pack from in-memory arrays: splits maps split -> (past, current, mask, ids) with past/current
    [N,T,T,3] uint8, mask [N,T,T] uint8, ids list[str]. Missing splits are written empty."""
    tile = None
    for past, _, _, _ in splits.values():
        tile = past.shape[1]
        break
    if tile is None:
        raise DataError(f"{path}: no tiles to write")
    with PackWriter(path, district=district, tile=tile, source=source, split_seed=split_seed,
                    mask_values=mask_values) as writer:
        for split, (past, current, mask, ids) in splits.items():
            if split not in SPLITS:
                raise ConfigError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
            for i, tile_id in enumerate(ids):
                writer.append(split, str(tile_id), past[i], current[i], mask[i])
    return Path(path)


# ----------------------------------------------------------------------------------------- image helpers

def read_rgb(path: Path) -> np.ndarray:
    """Decode an image as [H,W,3] uint8 (RGBA/greyscale/palette converted); DataError when unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def read_binary_mask(path: Path) -> np.ndarray:
    """Decode a LEVIR label as [H,W] uint8 with 1 where the grey value is >= 128."""
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    return (grey >= 128).astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def tile_origins(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """(y, x) top-left corners of the grid tiles: remainders dropped, images smaller than a tile padded."""
    ys = range(0, max(height - tile, 0) + 1, tile)
    xs = range(0, max(width - tile, 0) + 1, tile)
    return [(y, x) for y in ys for x in xs]


def cut_tiles(array: np.ndarray, tile: int, origins: list[tuple[int, int]]) -> list[np.ndarray]:
    """Crop `array` ([H,W] or [H,W,C]) at the origins; zero-pad crops that run past a small image."""
    out = []
    for y, x in origins:
        crop = array[y:y + tile, x:x + tile]
        if crop.shape[0] != tile or crop.shape[1] != tile:
            padded = np.zeros((tile, tile) + array.shape[2:], dtype=array.dtype)
            padded[:crop.shape[0], :crop.shape[1]] = crop
            crop = padded
        out.append(crop)
    return out


def tile_ids(stem: str, width: int, height: int, tile: int, origins: list[tuple[int, int]]) -> list[str]:
    """The stem itself when the image is exactly one tile, else stem_y<row px>_x<col px>."""
    if width == tile and height == tile:
        return [stem]
    return [f"{stem}_y{y:04d}_x{x:04d}" for y, x in origins]


# ------------------------------------------------------------------------------------------ source items

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


@dataclass
class PackReport:
    """What `pack_folder` did: packs written (district -> path, counts) and what it skipped and why."""

    written: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    source_format: str = ""


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
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")}


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


def check_item(item: Item, src: Path) -> None:
    """Cheap checks from image headers: files exist and are images, past/current/label sizes agree."""
    if item.kind == "geotiff":
        return check_geotiff_item(item)
    sizes = {}
    for role, path in (("past", item.past), ("current", item.current), ("label", item.label)):
        if role == "label" and item.kind == "json":
            continue
        try:
            sizes[role] = image_size(path)
        except DataError as exc:
            raise DataError(_shorten(str(exc), path, _relative(path, src))) from None
    if item.kind == "json":
        sizes["label"] = (item.json_label.width, item.json_label.height)
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{role} {w}x{h}" for role, (w, h) in sizes.items())
        raise DataError(f"{item.name}: sizes differ ({shown})")
    item.size = sizes["past"]


def load_item(item: Item, src: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one pair: past, current [H,W,3] uint8 and mask [H,W] uint8 (GeoTIFFs: views read by window)."""
    if item.kind == "geotiff":
        return load_geotiff_item(item)
    try:
        past, current = read_rgb(item.past), read_rgb(item.current)
        mask = rasterise(item.json_label) if item.kind == "json" else read_binary_mask(item.label)
    except DataError as exc:
        message = str(exc)
        for path in (item.past, item.current, item.label):
            message = _shorten(message, path, _relative(path, src))
        raise DataError(message) from None
    if not (past.shape[:2] == current.shape[:2] == mask.shape):
        raise DataError(f"{item.name}: decoded sizes differ (past {past.shape[1]}x{past.shape[0]}, "
                        f"current {current.shape[1]}x{current.shape[0]}, label {mask.shape[1]}x{mask.shape[0]})")
    return past, current, mask


# ------------------------------------------------------------------------------------------------ splits

def parse_split(text: str) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' -> fractions of train, val, test (non-negative, summing to 1, train > 0)."""
    try:
        parts = tuple(check_number("--split", float(p), "split_fraction") for p in text.split(","))
    except (ValueError, ConfigError):
        raise ConfigError(f"--split '{text}': expected three fractions in [0, 1] like 0.7,0.15,0.15") from None
    if len(parts) != 3 or parts[0] <= 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ConfigError(f"--split '{text}': expected three non-negative fractions summing to 1, train > 0")
    return parts  # type: ignore[return-value]


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split sizes: rounded fractions, every split with a positive fraction non-empty when n >= 3."""
    val = int(round(n * fractions[1]))
    test = int(round(n * fractions[2]))
    if n >= 3:
        val = max(val, 1) if fractions[1] > 0 else 0
        test = max(test, 1) if fractions[2] > 0 else 0
    while n - val - test < 1 and (val or test):
        if val >= test:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def assign_splits(keys: list[str], fractions, seed: int, district: str) -> dict[str, str]:
    """key -> split by a permutation seeded by (seed, district); the same inputs give the same split."""
    ordered = sorted(keys)
    rng = np.random.default_rng([int(seed), zlib.crc32(district.encode("utf-8"))])
    order = rng.permutation(len(ordered))
    n_train, n_val, _ = split_counts(len(ordered), fractions)
    out = {}
    for rank, index in enumerate(order):
        out[ordered[index]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


# ---------------------------------------------------------------------------------------------- packing

def pack_folder(src: str | Path, out_dir: str | Path, *, fmt: str = "auto", tile: int | None = None,
                split: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
                district_map: str | Path | None = None, skip_bad: bool = False,
                progress: Callable[[Iterable, int, str], Iterable] | None = None) -> PackReport:
    """Pack SRC into <out_dir>/<district>.h5, one per district. Without skip_bad the first bad item
    raises DataError (problems visible from names and headers are found before any pack is written);
    with skip_bad bad items and empty districts are skipped and
    listed in the report. Packs are complete or absent: a district whose write fails leaves no file."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise DataError(f"{src}: source folder not found")
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt not in ("json", "levir", "geotiff"):
        raise ConfigError(f"--format '{fmt}': use auto, json, levir or geotiff")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must not be negative")
    if tile is not None and tile < 1:
        raise ConfigError(f"--tile {tile}: must be positive")
    if fmt == "json" and district_map is not None:
        raise ConfigError("--district-map applies to LEVIR folders; JSON labels name their district")
    mapping = read_district_map(Path(district_map)) if district_map is not None else None
    if fmt in ("levir", "geotiff"):
        if not (src / "A").is_dir() and not any((s / "A").is_dir() for s in _subdirs(src)):
            raise DataError(f"{src}: not a LEVIR-CD folder (no A/ folder, nor sub-folders with A/)")
        items, problems = discover_levir(src, mapping, kind=fmt)
        tile = tile or DEFAULT_LEVIR_TILE
    else:
        items, problems = discover_json(src, exclude=out_dir.resolve())
    report = PackReport(source_format=fmt)

    def reject(name: str, message: str) -> None:
        if not skip_bad:
            raise DataError(message)
        report.skipped.append(message)

    for name, message in problems:
        reject(name, message)

    # cheap checks first (headers, names, duplicates) so a bad input fails before any pixel is decoded
    good: list[Item] = []
    seen: dict[tuple[str, str], str] = {}
    for item in items:
        try:
            if not _SAFE_NAME.match(item.district):
                raise DataError(f"{item.name}: district name '{item.district}' cannot be a file name")
            check_item(item, src)
            key = (item.district, item.tile_id)
            if key in seen:
                raise DataError(f"{item.name}: duplicate tile id '{item.tile_id}' in {item.district} "
                                f"(also {seen[key]})")
            seen[key] = item.name
        except DataError as exc:
            reject(item.name, str(exc))
            continue
        good.append(item)
    if not good:
        raise DataError(f"{src}: nothing to pack ({len(report.skipped)} item(s) skipped)")

    by_district: dict[str, list[Item]] = {}
    for item in good:
        by_district.setdefault(item.district, []).append(item)
    for district, district_items in by_district.items():
        district_tile = tile or district_items[0].size[0]
        if tile is None:  # JSON without --tile: every label must have the district's tile size
            for item in district_items:
                if item.size[0] != item.size[1]:
                    raise DataError(f"{item.name}: tile is {item.size[0]}x{item.size[1]}, not square "
                                    "(use --tile to cut it into square tiles)")
                if item.size != (district_tile, district_tile):
                    raise DataError(f"{item.name}: tile is {item.size[0]}x{item.size[1]} but {district}'s "
                                    f"tiles are {district_tile}x{district_tile} (use --tile to cut)")
        by_district[district] = district_items

    total = len(good)
    iterate = progress or (lambda iterable, length, label: iterable)
    bar = iter(iterate(range(total), total, "packing"))
    for district in sorted(by_district, key=district_order_key):
        district_items = by_district[district]
        district_tile = tile or district_items[0].size[0]
        assignment, split_rule = _plan_splits(district_items, district_tile, split, seed, district)
        source = f"{fmt}:{src.name}"
        target = out_dir / f"{district}.h5"
        typed = fmt == "json" or (fmt == "geotiff" and labels_typed(district_items))
        try:
            with PackWriter(target, district=district, tile=district_tile, source=source, split_seed=seed,
                            mask_values=MASK_VALUES_TYPED if typed else MASK_VALUES_BINARY,
                            extra_attrs={"split_fractions": np.array(split, np.float64),
                                         "split_rule": split_rule}) as writer:
                for item in district_items:
                    next(bar, None)
                    try:
                        past, current, mask = load_item(item, src)
                    except DataError as exc:
                        reject(item.name, str(exc))
                        continue
                    width, height = item.size
                    origins = tile_origins(width, height, district_tile)
                    ids = tile_ids(item.tile_id, width, height, district_tile, origins)
                    for tile_id, p, c, m in zip(ids, cut_tiles(past, district_tile, origins),
                                                cut_tiles(current, district_tile, origins),
                                                cut_tiles(mask, district_tile, origins)):
                        writer.append(assignment.get(tile_id, assignment.get(item.tile_id)), tile_id, p, c, m)
                if sum(writer.counts.values()) == 0:
                    message = f"{district}: empty district (every pair was skipped)"
                    if not skip_bad:
                        raise DataError(message)
                    report.skipped.append(message)
                    raise _EmptyDistrict()
        except _EmptyDistrict:
            continue
        report.written[district] = target
        report.counts[district] = dict(writer.counts)
    for _ in bar:
        pass
    return report


class _EmptyDistrict(Exception):
    """Internal: abandons the atomic write of a district whose items were all skipped."""


def fixed_splits(items: list[Item], district: str) -> dict[str, str] | None:
    """The splits the labels fix (tile id -> split), when every label of the district names one; None when
    none does. DataError when only some do: a half-fixed split would silently mix the two rules."""
    named = {item.tile_id: item.json_label.split for item in items
             if item.json_label is not None and item.json_label.split is not None}
    if not named:
        return None
    if len(named) < len(items):
        unnamed = next(item.name for item in items if item.tile_id not in named)
        raise DataError(f"{unnamed}: label has no 'split' while other labels of {district} fix theirs "
                        f"(name a split in every label of the district, or in none)")
    if "train" not in named.values():
        raise DataError(f"{district}: the labels' splits leave no training tile")
    return named


def _plan_splits(items: list[Item], tile: int, fractions, seed: int, district: str) -> tuple[dict[str, str], str]:
    """Split keys and the rule used: the labels' own splits when they fix them ("labels"); else by
    fractions ("fractions") of whole source images when the district has >= 3 of them, else of tiles."""
    fixed = fixed_splits(items, district)
    if fixed is not None:
        return fixed, "labels"
    if len(items) >= 3:
        return assign_splits([item.tile_id for item in items], fractions, seed, district), "fractions"
    keys = []
    for item in items:
        width, height = item.size
        keys += tile_ids(item.tile_id, width, height, tile, tile_origins(width, height, tile))
    return assign_splits(keys, fractions, seed, district), "fractions"
