"""Synthetic Seoul: 25 districts of bi-temporal aerial tiles with JSON change labels (`nfed synth`).

Each district has its own style (nfed.data.synthstyle) and every tile its own random stream; the tiles are
drawn by nfed.data.synthscene and written here, district by district, in worker processes.

Layout written: OUT/<district>/<tile id>.json (data/label_schema.json), <tile id>_past.png,
<tile id>_current.png, where tile id = <district>_<index, 5 digits>; plus OUT/manifest.csv
(district, tiles, change-pixel share, tiles per split). Same seed and options -> byte-identical files.

Evaluation tiles: with `test_tiles`/`val_tiles` > 0 every district gets that many held-out tiles, whatever
`scale` (which then sizes only the training data), recorded as the label's `split`. An F1 measured on a
district's test split then rests on the same number of pixels for every district and every scale, as a
benchmark's fixed test set does; the first indices are the test tiles, then the validation tiles, so the
evaluation tiles are identical for every scale.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from nfed import __version__
from nfed.common.atomic import atomic_folder, new_folder, write_text_atomic
from nfed.common.errors import ConfigError
from nfed.common.memory import worker_count
from nfed.common.validate import check_number
from nfed.data.districts import District, find_district, load_districts
from nfed.data.images import encode_png
from nfed.data.labels import label_document
from nfed.data.synthscene import SynthTile, generate_tile
from nfed.data.synthstyle import district_style


def tile_rng(seed: int, district: str, index: int) -> np.random.Generator:
    """Each tile has its own stream, so tiles are reproducible one by one."""
    return np.random.default_rng([int(seed), zlib.crc32(district.encode("utf-8")), int(index)])


def tile_count(district: District, scale: float, minimum: int) -> int:
    """max(minimum, round(scale x the study's sample count))."""
    return max(int(minimum), int(round(scale * district.samples)))


def split_of_index(index: int, val_tiles: int, test_tiles: int) -> str | None:
    """The split fixed for tile `index`: test first, then validation, then training (None: not fixed)."""
    if val_tiles == 0 and test_tiles == 0:
        return None
    if index < test_tiles:
        return "test"
    return "val" if index < test_tiles + val_tiles else "train"


def select_districts(names: str | Iterable[str] | None) -> list[District]:
    """'all' / None -> every district; else comma-separated names (romanised, with or without -gu, or Korean)."""
    if names is None or (isinstance(names, str) and names.strip().lower() == "all"):
        return load_districts()
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    chosen = [find_district(n) for n in names]
    if not chosen:
        raise ConfigError("--districts: no district named")
    seen = []
    for d in chosen:
        if d not in seen:
            seen.append(d)
    return seen


def _write_tile_files(folder: Path, tile_id: str, sample: SynthTile, label_json: str) -> None:
    (folder / f"{tile_id}_past.png").write_bytes(encode_png(sample.past))
    (folder / f"{tile_id}_current.png").write_bytes(encode_png(sample.current))
    (folder / f"{tile_id}.json").write_text(label_json, encoding="utf-8")


def write_district(out_dir: Path, district: District, count: int, *, tile: int, seed: int,
                   val_tiles: int = 0, test_tiles: int = 0, on_tile: Callable[[], None] | None = None) -> float:
    """Generate one district's tiles into OUT/<district>/ atomically (temp folder, then rename).
    Returns the change-pixel share. Files are encoded and written by two threads (zlib and file I/O
    release the GIL) while the main thread draws the next tiles; contents do not depend on timing."""
    style = district_style(district.name, seed)
    changed_pixels = 0
    pending: collections.deque = collections.deque()
    try:
        with atomic_folder(out_dir / district.name) as work, \
                concurrent.futures.ThreadPoolExecutor(max_workers=2) as writers:
            for index in range(count):
                tile_id = f"{district.name}_{index:05d}"
                sample = generate_tile(style, tile_rng(seed, district.name, index), tile)
                document = label_document(tile_id, district.name, f"{tile_id}_past.png",
                                          f"{tile_id}_current.png", tile, tile, sample.changes,
                                          source=f"nfed synth {__version__} seed={seed}",
                                          split=split_of_index(index, val_tiles, test_tiles))
                label_json = json.dumps(document, separators=(",", ":")) + "\n"
                pending.append(writers.submit(_write_tile_files, work, tile_id, sample, label_json))
                while len(pending) > 32:  # bounded memory
                    pending.popleft().result()
                changed_pixels += int(np.count_nonzero(sample.mask()))
                if on_tile is not None:
                    on_tile()
            while pending:
                pending.popleft().result()
    except BaseException:
        for future in pending:
            future.cancel()
        raise
    return changed_pixels / float(max(count, 1) * tile * tile)


def default_jobs() -> int:
    """Worker processes for synthesis: one per CPU, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def synthesise(out_dir: str | Path, *, scale: float = 0.025, tile: int = 64, seed: int = 0,
               districts: str | Iterable[str] | None = "all", min_per_district: int = 8, val_tiles: int = 0,
               test_tiles: int = 0, jobs: int | None = None,
               progress: Callable[[Iterable, int, str], Iterable] | None = None) -> dict[str, tuple[int, float]]:
    """Write the synthetic districts; returns district -> (tiles, change-pixel share).

    Without fixed evaluation tiles a district has max(min_per_district, round(scale x samples)) tiles and
    `nfed pack` splits them by fractions; with `val_tiles`/`test_tiles` that count is its training split and
    the evaluation tiles come on top. Districts are generated in `jobs` worker processes (default: one per
    CPU), at most one per district and as many as the memory holds; each tile has its own random stream, so the
    files are the same for any number of workers."""
    scale = check_number("--scale", scale, "scale")
    tile = check_number("--tile", tile, "tile")
    min_per_district = check_number("--min-per-district", min_per_district, "min_per_district")
    seed = check_number("--seed", seed, "seed")
    val_tiles = check_number("--val-tiles", val_tiles, "eval_tiles")
    test_tiles = check_number("--test-tiles", test_tiles, "eval_tiles")
    if (val_tiles == 0) != (test_tiles == 0):
        raise ConfigError("--val-tiles and --test-tiles: fix both (> 0) or neither (0 and 0)")
    jobs = 0 if jobs is None else check_number("--jobs", jobs, "jobs")
    chosen = select_districts(districts)
    jobs = worker_count(jobs or default_jobs(), len(chosen), say=jobs > 0)
    with new_folder(out_dir):
        return _synthesise(Path(out_dir), chosen, scale=scale, tile=tile, seed=seed,
                           min_per_district=min_per_district, val_tiles=val_tiles, test_tiles=test_tiles,
                           jobs=jobs, progress=progress)


def _synthesise(out_dir: Path, chosen: list, *, scale, tile, seed, min_per_district, val_tiles, test_tiles, jobs,
                progress):
    held_out = val_tiles + test_tiles
    counts = {d.name: tile_count(d, scale, min_per_district) + held_out for d in chosen}
    total = sum(counts.values())
    iterate = progress or (lambda iterable, length, label: iterable)
    bar = iter(iterate(range(total), total, "synth"))
    shares: dict[str, float] = {}
    if jobs == 1:
        for district in chosen:
            shares[district.name] = write_district(out_dir, district, counts[district.name], tile=tile,
                                                   seed=seed, val_tiles=val_tiles, test_tiles=test_tiles,
                                                   on_tile=lambda: next(bar, None))
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            largest_first = sorted(chosen, key=lambda d: -counts[d.name])
            futures = {pool.submit(write_district, out_dir, d, counts[d.name], tile=tile, seed=seed,
                                   val_tiles=val_tiles, test_tiles=test_tiles): d
                       for d in largest_first}
            for future in concurrent.futures.as_completed(futures):
                district = futures[future]
                shares[district.name] = future.result()
                for _ in range(counts[district.name]):
                    next(bar, None)
    for _ in bar:
        pass
    summary = {d.name: (counts[d.name], shares[d.name]) for d in chosen}
    lines = ["district,tiles,change_pixel_share,train,val,test"] + [
        f"{name},{n},{share:.4f},{n - held_out if held_out else ''},{val_tiles or ''},{test_tiles or ''}"
        for name, (n, share) in summary.items()]
    write_text_atomic(out_dir / "manifest.csv", "\n".join(lines) + "\n")
    return summary
