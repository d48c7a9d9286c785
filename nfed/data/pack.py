"""Ingest of raw change-detection pairs into one HDF5 pack per district (format: nfed.data.packformat).

The inputs (JSON-labelled pairs, LEVIR-CD folders, GeoTIFF pairs with GeoJSON labels) are found and decoded
by nfed.data.sources; the packs are written by nfed.data.packwriter.

Images of any size are cut on a grid of tile x tile from the top-left corner; a remainder narrower than a
tile at the right or bottom edge is dropped, and an image smaller than one tile is zero-padded (mask 0).
Splits come from the labels when every label of a district names one (`split`, e.g. `nfed synth`'s fixed
evaluation tiles); otherwise they are drawn per district by a seeded permutation: of source images when the
district has at least 3 of them (so tiles of one image never straddle train and test), else of tiles.
Every pack is written to a temporary file and renamed at the end, so an interrupted pack leaves no file
that looks valid.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from nfed.common.errors import ConfigError, DataError
from nfed.common.names import check_name, child_path
from nfed.common.validate import check_number
from nfed.data.districts import district_order_key
from nfed.data.geopack import labels_typed
from nfed.data.images import cut_tiles, pixel_budget, tile_ids, tile_origins
from nfed.data.packformat import MASK_VALUES_BINARY, MASK_VALUES_TYPED
from nfed.data.packwriter import PackWriter
from nfed.data.sources import (Item, check_item, detect_format, discover_json, discover_levir, load_item,
                               read_district_map)

DEFAULT_LEVIR_TILE = 256


@dataclass
class PackReport:
    """What `pack_folder` did: packs written (district -> path, counts), what it skipped and why, and how many
    images were smaller than a tile (zero-padded: mostly padding in a tile means a --tile too large)."""

    written: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    source_format: str = ""
    padded: int = 0


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
        items, problems = discover_levir(src, mapping, kind=fmt)
        tile = tile or DEFAULT_LEVIR_TILE
    else:
        items, problems = discover_json(src, exclude=out_dir.resolve())
    report = PackReport(source_format=fmt)
    budget = pixel_budget(tile or 0)

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
            check_name(item.district, item.name)
            check_item(item, src, budget)
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
        target = child_path(out_dir, district, ".h5")
        typed = fmt == "json" or (fmt == "geotiff" and labels_typed(district_items))
        try:
            with PackWriter(target, district=district, tile=district_tile, source=source, split_seed=seed,
                            mask_values=MASK_VALUES_TYPED if typed else MASK_VALUES_BINARY,
                            extra_attrs={"split_fractions": np.array(split, np.float64),
                                         "split_rule": split_rule}) as writer:
                for item in district_items:
                    next(bar, None)
                    width, height = item.size
                    origins = tile_origins(width, height, district_tile)
                    ids = tile_ids(item.tile_id, width, height, district_tile, origins)
                    try:    # GeoTIFFs are lazy views: their windows are read while cutting, so cut before writing
                        past, current, mask = load_item(item, src)
                        tiles = list(zip(ids, cut_tiles(past, district_tile, origins),
                                         cut_tiles(current, district_tile, origins),
                                         cut_tiles(mask, district_tile, origins)))
                    except DataError as exc:
                        reject(item.name, str(exc))
                        continue
                    report.padded += width < district_tile or height < district_tile
                    for tile_id, p, c, m in tiles:
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
