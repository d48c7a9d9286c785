"""The HDF5 district pack format, defined once for its writer (nfed.data.packwriter) and reader (nfed.data.reader).

One file per district. Root attributes: district, tile_size, format_version, source, split_seed, nfed_version,
mask_values ('code=name,...'), num_samples ([train, val, test]) and, from `nfed pack`, split_fractions and
split_rule. One group per split, each with datasets past and current [N,T,T,3] uint8, mask [N,T,T] uint8
(values 0..MAX_MASK_VALUE) and ids [N] UTF-8 strings, chunked one tile per chunk so a reader fetches single
tiles cheaply. A change to any of this bumps FORMAT_VERSION, and the reader keeps reading the versions listed
in SUPPORTED_FORMAT_VERSIONS.
"""
from __future__ import annotations

import h5py
import numpy as np

from nfed.data.labels import CHANGE_TYPES

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
SPLITS = ("train", "val", "test")
REQUIRED_ATTRS = ("district", "tile_size", "format_version")
TILE_DATASETS = ("past", "current", "mask")   # one tile per row; "ids" names the rows
IDS_DATASET = "ids"
TILE_DTYPE = np.uint8
IDS_DTYPE = h5py.string_dtype("utf-8")
IDS_CHUNK = 256
MAX_MASK_VALUE = 4   # format version 1: 0 = no change, 1..4 = new, demolished, renewed, recoloured
MASK_VALUES_TYPED = "0=none," + ",".join(f"{code}={name}" for code, name in enumerate(CHANGE_TYPES, 1))
MASK_VALUES_BINARY = "0=none,1=change"


def row_shapes(tile: int) -> dict[str, tuple[int, ...]]:
    """The shape of one row of every dataset of a split (after the leading tile axis), in creation order."""
    return {"past": (tile, tile, 3), "current": (tile, tile, 3), "mask": (tile, tile), IDS_DATASET: ()}


def mask_value_names(mask_values: str) -> dict[str, str]:
    """'0=none,1=change' -> {'0': 'none', '1': 'change'} (the attribute mask_values read back)."""
    return dict(item.split("=", 1) for item in str(mask_values).split(",") if "=" in item)
