"""Reading district packs (HDF5, format of nfed.data.packformat) as shuffled, augmented batches on a device.

A batch reads only its own tiles from disk (each tile is one HDF5 chunk), so a pack larger than memory
trains fine. The shuffle order and the augmentation (one of the 8 flips/90-degree rotations per tile,
identical for past, current and mask) depend only on the seed, so runs repeat exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import h5py
import numpy as np

from nfed.common import backend
from nfed.common.errors import ConfigError, DataError
from nfed.common.h5check import check_h5_file
from nfed.common.names import check_name
from nfed.data.districts import district_order_key
from nfed.data.images import images_to_nchw_float
from nfed.data.packformat import (IDS_DATASET, MASK_VALUES_BINARY, MAX_MASK_VALUE, REQUIRED_ATTRS, SPLITS,
                                  SUPPORTED_FORMAT_VERSIONS, TILE_DATASETS, TILE_DTYPE, mask_value_names, row_shapes)

_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


class Batch(NamedTuple):
    """past/current float32 [B,3,H,W] in [0,1] and mask int64 [B,H,W] on the device; ids of the tiles."""

    past: object
    current: object
    mask: object
    ids: list


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def augment_tiles(past: np.ndarray, current: np.ndarray, mask: np.ndarray,
                  transforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply per-tile dihedral transforms (code 0..7: rot90 k = code % 4, then a left-right flip when
    code >= 4) to NHWC images and NHW masks, the same one to both dates and the mask."""
    past, current, mask = past.copy(), current.copy(), mask.copy()
    for i, code in enumerate(transforms):
        k, flip = int(code) % 4, int(code) >= 4
        for array in (past, current, mask):
            tile = np.rot90(array[i], k, axes=(0, 1))
            array[i] = tile[:, ::-1] if flip else tile
    return past, current, mask


class _TileSource:
    """What DistrictPack and PooledPacks share: closing as a context manager and seeded batches of a split,
    given their close, num_samples and read."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def batches(self, split: str, batch_size: int, *, shuffle: bool = True, augment: bool = False,
                seed: int = 0, device="cpu", drop_last: bool = False) -> Iterator[Batch]:
        """Batches of one pass over a split; order and augmentation are fixed by `seed` (vary it per
        epoch for fresh shuffles)."""
        return iterate_batches(self, split, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                               device=device, drop_last=drop_last)


class DistrictPack(_TileSource):
    """One district's pack: `with DistrictPack(path) as pack: for batch in pack.batches("train", 8): ...`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            packs = [p.name for p in list_packs(self.path)]
            raise DataError(f"{self.path}: is a folder, not a pack; " + (
                f"give one of its {len(packs)} pack(s): {', '.join(packs[:6])}" + (", ..." if len(packs) > 6 else "")
                if packs else "it holds no packs (*.h5)"))
        if not self.path.exists():
            raise DataError(f"{self.path}: pack not found")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 pack (truncated or corrupt: "
                            f"{str(exc).splitlines()[0][:120]})") from None
        try:
            check_h5_file(self._file, self.path, rows="tiles")
            self._validate()
        except DataError:
            self._file.close()
            raise
        except _READ_ERRORS as exc:
            self._file.close()
            raise DataError(f"{self.path}: damaged pack ({str(exc).splitlines()[0][:120]})") from None

    def _validate(self) -> None:
        attrs = {key: _attr_value(value) for key, value in self._file.attrs.items()}
        missing = [name for name in REQUIRED_ATTRS if name not in attrs]
        if missing:
            raise DataError(f"{self.path}: not an nfed pack (missing attribute(s) {', '.join(missing)})")
        if attrs["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
            raise DataError(f"{self.path}: pack format version {attrs['format_version']} is not supported "
                            f"(this nfed reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})")
        self.attrs = attrs
        self.district = check_name(attrs["district"], str(self.path))
        tile = attrs["tile_size"]
        if isinstance(tile, bool) or not isinstance(tile, int) or not 0 < tile <= 65536:
            raise DataError(f"{self.path}: attribute tile_size {tile!r} is not a positive integer")
        self.tile = t = tile
        self.max_mask_value = _max_mask_value(self.path, attrs.get("mask_values"))
        self._counts = {}
        self._ids: dict[str, list[str]] = {}
        self._datasets: dict[str, dict] = {}  # h5py lookups by name are slow; keep the handles
        for split in SPLITS:
            if split not in self._file:
                raise DataError(f"{self.path}: not an nfed pack (group '{split}' missing)")
            group = self._file[split]
            expected = row_shapes(t)
            n = None
            for name, tail in expected.items():
                if name not in group:
                    raise DataError(f"{self.path}: not an nfed pack (dataset '{split}/{name}' missing)")
                dataset = group[name]
                if not isinstance(dataset, h5py.Dataset):
                    raise DataError(f"{self.path}: '{split}/{name}' is not a dataset")
                shape = dataset.shape
                if shape is None or shape[1:] != tail or (n is not None and shape[0] != n):
                    raise DataError(f"{self.path}: dataset '{split}/{name}' has shape {shape}, "
                                    f"inconsistent with tile size {t} and the other datasets")
                if name == IDS_DATASET:
                    wanted, matches = "a string", h5py.check_string_dtype(dataset.dtype) is not None
                else:
                    wanted, matches = np.dtype(TILE_DTYPE).name, dataset.dtype == TILE_DTYPE
                if not matches:
                    raise DataError(f"{self.path}: dataset '{split}/{name}' has dtype {dataset.dtype}, expected "
                                    f"{wanted} (pack format version {attrs['format_version']})")
                n = shape[0]
            self._counts[split] = int(n)
            self._datasets[split] = {name: group[name] for name in expected}

    def close(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and file.id.valid:
            file.close()

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        return f"DistrictPack({str(self.path)!r}, district={self.district!r}, tile={self.tile}, " \
               f"samples={self._counts})"

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"{self.path}: unknown split '{split}' (use {', '.join(SPLITS)})")

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        return self._counts[split]

    def read(self, split: str, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Raw tiles at `indices` (any order, repeats allowed): past/current [B,H,W,3] uint8, mask [B,H,W]
        uint8, ids. Reads only those tiles (HDF5 fancy indexing over sorted unique indices)."""
        self._check_split(split)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self._counts[split]
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise DataError(f"{self.path}: index out of range for split '{split}' with {n} tiles")
        unique, inverse = np.unique(indices, return_inverse=True)
        group = self._datasets[split]
        # h5py point selections over scattered rows are very slow; contiguous slices are fast
        runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1) if unique.size else []
        try:
            arrays = [np.concatenate([group[name][run[0]:run[-1] + 1] for run in runs])[inverse]
                      if runs else np.empty((0,) + group[name].shape[1:], TILE_DTYPE)
                      for name in TILE_DATASETS]
        except _READ_ERRORS as exc:
            raise DataError(f"{self.path}: cannot read split '{split}' (truncated or corrupt pack: "
                            f"{str(exc).splitlines()[0][:120]})") from None
        self.ids(split)  # fills the cache
        all_ids = self._ids[split]
        if arrays[2].size and int(arrays[2].max()) > self.max_mask_value:
            bad = int(np.flatnonzero(arrays[2].reshape(len(indices), -1).max(axis=1) > self.max_mask_value)[0])
            raise DataError(f"{self.path}: dataset '{split}/mask' holds value {int(arrays[2].max())} (tile "
                            f"{all_ids[indices[bad]]}); pack format version {self.attrs['format_version']} "
                            f"allows 0-{self.max_mask_value}")
        return arrays[0], arrays[1], arrays[2], [all_ids[i] for i in indices]

    def ids(self, split: str) -> list[str]:
        """Tile ids of a split in stored order (read once, then cached: they are small)."""
        self._check_split(split)
        if split not in self._ids:
            try:
                self._ids[split] = [str(s) for s in self._datasets[split][IDS_DATASET].asstr()[:]]
            except _READ_ERRORS as exc:
                raise DataError(f"{self.path}: cannot read ids of split '{split}' ({exc})") from None
        return list(self._ids[split])

    def iter_masks(self, split: str, block: int = 64) -> Iterator[np.ndarray]:
        """Masks in blocks of `block` tiles (bounded memory), e.g. for statistics."""
        for start in range(0, self.num_samples(split), block):
            stop = min(start + block, self._counts[split])
            yield self.read(split, np.arange(start, stop))[2]

    def summary(self) -> dict:
        """What `nfed info` shows: counts per split, change-pixel share, pixels and tiles per mask value."""
        names = mask_value_names(self.attrs.get("mask_values", MASK_VALUES_BINARY))
        pixels = np.zeros(256, np.int64)
        tiles_with = np.zeros(256, np.int64)
        splits = {}
        for split in SPLITS:
            split_pixels = np.zeros(256, np.int64)
            for masks in self.iter_masks(split):
                flat = masks.reshape(masks.shape[0], -1)
                split_pixels += np.bincount(flat.ravel(), minlength=256)
                for value in np.unique(flat):
                    tiles_with[value] += int(np.count_nonzero((flat == value).any(axis=1)))
            total = int(split_pixels.sum())
            splits[split] = {"tiles": self._counts[split],
                             "change_pixel_share": float(split_pixels[1:].sum() / total) if total else 0.0}
            pixels += split_pixels
        total = int(pixels.sum())
        change_types = {names.get(str(v), f"value {v}"): {"pixels": int(pixels[v]), "tiles": int(tiles_with[v])}
                        for v in range(1, 256) if pixels[v] or str(v) in names}
        return {"path": str(self.path), "district": self.district, "tile_size": self.tile,
                "source": str(self.attrs.get("source", "")), "split_seed": self.attrs.get("split_seed"),
                "format_version": self.attrs.get("format_version"),
                "nfed_version": str(self.attrs.get("nfed_version", "")),
                "tiles": sum(self._counts.values()), "splits": splits,
                "change_pixel_share": float(pixels[1:].sum() / total) if total else 0.0,
                "change_types": change_types}


def iterate_batches(source, split: str, batch_size: int, *, shuffle: bool, augment: bool, seed: int, device,
                    drop_last: bool) -> Iterator[Batch]:
    """One pass over `source`'s split (anything with num_samples/read, e.g. a DistrictPack or PooledPacks)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if seed < 0:
        raise ConfigError(f"seed must not be negative, got {seed}")
    target = backend.parse_device(device)
    n = source.num_samples(split)
    order = np.random.default_rng([int(seed), 0]).permutation(n) if shuffle else np.arange(n)
    transforms = np.random.default_rng([int(seed), 1]).integers(0, 8, size=n) if augment else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        indices = order[start:start + batch_size]
        past, current, mask, ids = source.read(split, indices)
        if transforms is not None:
            past, current, mask = augment_tiles(past, current, mask, transforms[start:start + len(indices)])
        yield Batch(past=backend.to_device(images_to_nchw_float(past), target),
                    current=backend.to_device(images_to_nchw_float(current), target),
                    mask=backend.to_device(mask.astype(np.int64), target), ids=ids)


class PooledPacks(_TileSource):
    """Several district packs read as one (the centralised baseline's pooled data): a split's tiles are the
    districts' tiles of that split, in district order, so shuffled batches mix districts.

    Used like a DistrictPack by training.fit/evaluate; `district` is "pooled"."""

    def __init__(self, paths):
        self.packs = [DistrictPack(path) for path in paths]
        if not self.packs:
            raise DataError("no district packs to pool")
        tiles = {pack.tile for pack in self.packs}
        if len(tiles) > 1:
            raise DataError(f"packs of different tile sizes cannot be pooled: {sorted(tiles)}")
        self.tile = tiles.pop()
        self.district = "pooled"
        self.path = Path(self.packs[0].path).parent
        self._offsets = {split: np.cumsum([0] + [p.num_samples(split) for p in self.packs]) for split in SPLITS}

    def close(self) -> None:
        for pack in self.packs:
            pack.close()

    def num_samples(self, split: str) -> int:
        self.packs[0]._check_split(split)
        return int(self._offsets[split][-1])

    def read(self, split: str, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Tiles at pooled `indices` (in that order), read pack by pack."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        offsets = self._offsets[split]
        if indices.size and (indices.min() < 0 or indices.max() >= offsets[-1]):
            raise DataError(f"pooled index out of range for split '{split}' with {offsets[-1]} tiles")
        owner = np.searchsorted(offsets, indices, side="right") - 1
        shapes = row_shapes(self.tile)
        past, current, mask = (np.empty((indices.size,) + shapes[name], TILE_DTYPE) for name in TILE_DATASETS)
        ids: list = [None] * indices.size
        for k in np.unique(owner):
            where = np.flatnonzero(owner == k)
            p, c, m, pack_ids = self.packs[k].read(split, indices[where] - offsets[k])
            past[where], current[where], mask[where] = p, c, m
            for position, tile_id in zip(where, pack_ids):
                ids[position] = f"{self.packs[k].district}/{tile_id}"
        return past, current, mask, ids


def _max_mask_value(path: Path, mask_values) -> int:
    """The largest mask value the pack declares (attribute mask_values, e.g. '0=none,1=change'); 4 (the
    change types of format version 1) when it declares none."""
    if mask_values is None:
        return MAX_MASK_VALUE
    try:
        codes = [int(code) for code in mask_value_names(mask_values)]
    except ValueError:
        raise DataError(f"{path}: attribute mask_values {str(mask_values)[:60]!r} is not 'code=name,...'") from None
    if not codes or min(codes) < 0 or max(codes) > MAX_MASK_VALUE:
        raise DataError(f"{path}: attribute mask_values {str(mask_values)[:60]!r} must list codes 0-{MAX_MASK_VALUE}")
    return max(codes)


def list_packs(directory: str | Path) -> list[Path]:
    """The packs (*.h5) in a folder, in the study's district order (unknown names last, alphabetic)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: pack folder not found")
    packs = [p for p in directory.glob("*.h5") if p.is_file() and not p.name.startswith(".")]
    return sorted(packs, key=lambda p: district_order_key(p.stem))
