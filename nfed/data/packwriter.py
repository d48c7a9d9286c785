"""Writing district packs (the HDF5 format of nfed.data.packformat): tile by tile or from arrays, atomically."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from nfed import __version__
from nfed.common.errors import ConfigError, DataError
from nfed.common.h5write import create_h5, raise_if_failed
from nfed.data.packformat import (FORMAT_VERSION, IDS_CHUNK, IDS_DATASET, IDS_DTYPE, MASK_VALUES_TYPED, SPLITS,
                                  TILE_DATASETS, TILE_DTYPE, row_shapes)


class PackWriter:
    """Append tiles split by split into `<path>` (HDF5, format of nfed.data.packformat), atomically.

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
        for split in SPLITS:
            group = self._file.create_group(split)
            for name, row in row_shapes(self.tile).items():
                if name == IDS_DATASET:
                    group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=IDS_DTYPE, chunks=(IDS_CHUNK,))
                else:
                    group.create_dataset(name, shape=(0,) + row, maxshape=(None,) + row, dtype=TILE_DTYPE,
                                         chunks=(1,) + row, compression="gzip",
                                         compression_opts=self.compression_level)
        return self

    def append(self, split: str, tile_id: str, past: np.ndarray, current: np.ndarray,
               mask: np.ndarray) -> None:
        """Add one tile (past/current [T,T,3] uint8, mask [T,T] uint8) to a split."""
        shapes = row_shapes(self.tile)
        if past.shape != shapes["past"] or current.shape != shapes["current"] or mask.shape != shapes["mask"]:
            raise DataError(f"{tile_id}: tile shapes {past.shape}, {current.shape}, {mask.shape} "
                            f"do not match the pack's tile size {self.tile}")
        if split not in self._buffers:
            raise DataError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
        buffer = self._buffers[split]
        buffer.append((tile_id, np.asarray(past, TILE_DTYPE), np.asarray(current, TILE_DTYPE),
                       np.asarray(mask, TILE_DTYPE)))
        self.counts[split] += 1
        if len(buffer) >= self.BLOCK:
            self._flush(split)

    def _flush(self, split: str) -> None:
        """Write buffered tiles of a split in one resize (h5py resizes per tile are slow)."""
        buffer = self._buffers[split]
        if not buffer:
            return
        group = self._file[split]
        start = group[IDS_DATASET].shape[0]
        stop = start + len(buffer)
        for position, name in enumerate((IDS_DATASET,) + TILE_DATASETS):
            dataset = group[name]
            dataset.resize(stop, axis=0)
            if name == IDS_DATASET:
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
