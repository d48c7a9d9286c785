"""The district packs a run reads: found in a folder, fingerprinted so a resume notices changed data."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from nfed.common.errors import DataError
from nfed.data.reader import DistrictPack, list_packs


def find_packs(data_dir: str | Path) -> dict[str, Path]:
    """district name -> pack path for every pack in `data_dir`, in the study's order (DataError when missing or
    empty, or when two packs hold one district: using either would silently drop or double-count data)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: packs folder not found")
    paths = list_packs(data_dir)
    if not paths:
        raise DataError(f"{data_dir}: no district packs (*.h5) found")
    packs: dict[str, Path] = {}
    for path in paths:
        with DistrictPack(path) as pack:
            district = pack.district
        if district in packs:
            raise DataError(f"{packs[district]} and {path} both hold district {district!r}: keep one of them")
        packs[district] = Path(path)
    return packs


def pack_fingerprint(path: Path) -> str | None:
    """sha256 of a pack file's bytes (None when the path is not a file, e.g. a remote node's pack)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the pack ({exc.strerror or exc})") from None
    return "sha256:" + digest.hexdigest()


def train_counts(packs: Mapping[str, Path]) -> dict[str, int]:
    """district -> training samples of its pack, for the packs readable here (a remote node's is not)."""
    counts = {}
    for district, path in packs.items():
        if Path(path).is_file():
            with DistrictPack(path) as pack:
                counts[district] = int(pack.num_samples("train"))
    return counts


def shared_tile(paths) -> int | None:
    """The tile size shared by the packs (None when they cannot be read here or differ)."""
    tiles = set()
    for path in paths:
        if not Path(path).is_file():
            return None
        with DistrictPack(path) as pack:
            tiles.add(pack.tile)
    return tiles.pop() if len(tiles) == 1 else None


def describe_pack(path: Path) -> dict:
    """What a Flower node tells the server about its data: district, tile size, split sizes, fingerprint (no data)."""
    with DistrictPack(path) as pack:
        info = {"district": pack.district, "tile": int(pack.tile),
                "samples": {split: int(pack.num_samples(split)) for split in ("train", "val", "test")}}
    info["fingerprint"] = pack_fingerprint(path)
    return info


def pack_district(path: Path) -> str:
    """The district a pack holds (read from the pack; hashing it is for describe only)."""
    with DistrictPack(path) as pack:
        return pack.district
