"""nfed's Flower messages: how weights, set-ups, metrics and a node's description travel, and the checks the
server applies to what comes back.

Weights travel as an ArrayRecord: one flat NumPy array per dtype and a manifest of parameter names and
shapes (Flower serialises arrays with np.save(allow_pickle=False) and cuts them into 5 MB chunks); the
set-up and metrics as JSON text, at most MAX_TEXT_BYTES per record. A compressed update
(nfed.federation.compression) travels the same way: its arrays packed like weights, its manifest as JSON under
DELTA_KEY.
"""
from __future__ import annotations

import io
import json
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from nfed.common import strict_json
from nfed.common.backend import to_numpy
from nfed.common.errors import ConfigError, DataError
from nfed.common.validate import Limit, check_number
from nfed.federation.client import clean_metrics
from nfed.federation.compression import manifest_text
from nfed.federation.roster import valid_district_name

WEIGHTS_RECORD = "weights"
SETUP_RECORD = "setup"
RESULT_RECORD = "result"
DESCRIBE = "describe"
MANIFEST_KEY = "manifest"
DELTA_KEY = "delta-manifest"      # present in a weights record that carries a compressed update
PACKED_PREFIX = "packed."
NUMERIC_KINDS = "biuf"
MAX_TEXT_BYTES = 1 << 20          # set-up, metrics and descriptions are small JSON texts
WEIGHTS_SLACK_BYTES = 1 << 20     # .npy headers and the manifest on top of the model's own bytes

SPLITS = ("train", "val", "test")
COUNT_LIMIT = Limit(0, 10**9, integer=True)


# ------------------------------------------------------------------------------------------ weights

def weights_to_record(weights: Mapping[str, object]) -> ArrayRecord:
    """The weights as an ArrayRecord: one flat NumPy array per dtype plus a manifest of names and shapes.

    Flower moves every Array (and each of its 5 MB chunks) as an object of its own, one HTTP request per
    object per hop; W-Net-CD's ~240 named arrays made one round trip take over a minute on a loaded
    loopback, one packed array per dtype takes seconds. Names travel in the manifest, so nothing depends
    on order. CuPy arrays are copied to the host first; nothing is pickled (Flower stores np.save bytes).
    """
    groups: dict[str, list[np.ndarray]] = {}
    manifest = []
    for name, value in weights.items():
        array = np.asarray(to_numpy(value))
        if array.dtype.kind not in NUMERIC_KINDS:
            raise DataError(f"cannot send '{name}': dtype {array.dtype} is not numeric")
        group = groups.setdefault(array.dtype.str, [])
        manifest.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape),
                         "offset": int(sum(a.size for a in group))})
        group.append(array.ravel())
    record = ArrayRecord()
    record[MANIFEST_KEY] = Array(np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8))
    for dtype, arrays in groups.items():
        record[PACKED_PREFIX + dtype] = _packed_array(np.dtype(dtype), arrays)
    return record


def _packed_array(dtype: np.dtype, arrays: list[np.ndarray]) -> Array:
    """One flat Array of `arrays`, the bytes np.save writes, without np.concatenate's and np.save's copies of
    the model: the .npy header, then each array's memory written straight into the buffer once."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False,
                                                  "shape": (int(sum(a.size for a in arrays)),)})
    for array in arrays:
        buffer.write(np.ascontiguousarray(array).view(np.uint8).data)
    return Array(dtype=str(dtype), shape=(int(sum(a.size for a in arrays)),), stype="numpy.ndarray",
                 data=buffer.getvalue())


def _unpacked(array: Array) -> np.ndarray:
    """A packed Array as a read-only NumPy view of its received bytes (Flower's Array.numpy() copies them with
    np.load); anything but a flat C-order .npy of a numeric dtype is refused. Nothing is unpickled."""
    data = array.data
    if not isinstance(data, bytes) or array.stype != "numpy.ndarray":
        raise ValueError("a packed array is not .npy bytes")
    header = io.BytesIO(data[:65536 + 16])
    version = np.lib.format.read_magic(header)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(header)   # refuses object dtypes (they would need pickle)
    if fortran_order or len(shape) != 1 or dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"a packed array is {dtype} of shape {shape}, not a flat numeric array")
    offset = header.tell()
    if len(data) - offset != shape[0] * dtype.itemsize:
        raise ValueError(f"a packed array holds {len(data) - offset} bytes, its header says {shape[0]} values")
    return np.frombuffer(data, dtype=dtype, count=shape[0], offset=offset)


def record_bytes(record) -> int:
    """Bytes of a record's payload as received (array bytes, or text of a config record), before decoding."""
    if isinstance(record, ArrayRecord):
        return sum(len(array.data) for array in record.values())
    if isinstance(record, ConfigRecord):
        return sum(len(str(key)) + len(str(value)) for key, value in record.items())
    raise DataError(f"unexpected record of type {type(record).__name__}")


def record_to_weights(record: ArrayRecord, max_bytes: int | None = None, copy: bool = True
                      ) -> dict[str, np.ndarray]:
    """name -> NumPy array from `weights_to_record`'s packing (DataError when the record is inconsistent or,
    with `max_bytes`, larger than that: a reply cannot be bigger than the model it carries). With copy=False
    the arrays are read-only views of the received bytes (the server only reads a reply: no copy of the model)."""
    if not isinstance(record, ArrayRecord):
        raise DataError(f"unreadable weights record (a {type(record).__name__}, not an ArrayRecord)")
    if max_bytes is not None and record_bytes(record) > max_bytes:
        raise DataError(f"weights record of {record_bytes(record)} bytes exceeds the model's {max_bytes}")
    try:
        manifest = strict_json.loads(record[MANIFEST_KEY].numpy().tobytes().decode("utf-8"))
        if not isinstance(manifest, list):
            raise ValueError("the manifest is not a list")
        packed = {key[len(PACKED_PREFIX):]: _unpacked(record[key]) for key in record if key.startswith(PACKED_PREFIX)}
        weights = {}
        for entry in manifest:
            dtype = np.dtype(entry["dtype"])
            flat = packed[entry["dtype"]]
            size = int(np.prod(entry["shape"], dtype=np.int64))
            offset = int(entry["offset"])
            if dtype.kind not in NUMERIC_KINDS or flat.dtype != dtype or offset < 0 or offset + size > flat.size:
                raise ValueError(f"entry '{entry['name']}' does not fit its packed {flat.dtype} array")
            view = flat[offset:offset + size].reshape(entry["shape"])
            weights[str(entry["name"])] = view.copy() if copy else view
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"unreadable weights record ({str(exc)[:200]})") from None
    return weights


def update_to_record(payload: Mapping) -> ArrayRecord:
    """A compressed update as an ArrayRecord: its arrays packed like weights, its manifest as JSON text."""
    record = weights_to_record(payload["arrays"])
    record[DELTA_KEY] = Array(np.frombuffer(manifest_text(payload["manifest"]), dtype=np.uint8))
    return record


def is_update_record(record) -> bool:
    return isinstance(record, ArrayRecord) and DELTA_KEY in record


def record_to_update(record: ArrayRecord, max_bytes: int | None = None, copy: bool = True) -> dict:
    """The compressed update of `update_to_record` as nfed.federation.compression's payload (its contents are
    checked when it is decoded against the global model; DataError here when the record cannot be read)."""
    arrays = record_to_weights(record, max_bytes, copy)
    try:
        manifest = strict_json.loads(record[DELTA_KEY].numpy().tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable compressed update manifest ({str(exc)[:200]})") from None
    return {"manifest": manifest, "arrays": arrays}


def json_record(**values) -> ConfigRecord:
    """Values as a config record of strict JSON texts."""
    return ConfigRecord({key: strict_json.dumps(value, sort_keys=True) for key, value in values.items()})


def from_json_record(record: ConfigRecord, key: str):
    """One JSON value of a received config record (DataError when it is missing, too large or malformed)."""
    if not isinstance(record, ConfigRecord):
        raise DataError(f"Flower message has a {type(record).__name__} where a config record was expected")
    if record_bytes(record) > MAX_TEXT_BYTES:
        raise DataError(f"Flower message's config record exceeds {MAX_TEXT_BYTES} bytes")
    try:
        return strict_json.loads(str(record[key]))
    except (KeyError, ValueError) as exc:
        raise DataError(f"Flower message lacks a readable '{key}' entry ({str(exc)[:200]})") from None


# ------------------------------------------------------------------------------------------ replies

def check_description(info) -> dict:
    """A node's self-description as the server may rely on it (DataError for anything malformed)."""
    if not isinstance(info, dict):
        raise DataError("its description is not a JSON object")
    district, tile, samples = info.get("district"), info.get("tile"), info.get("samples")
    if not valid_district_name(district):
        raise DataError(f"its district name {str(district)[:40]!r} is not a valid name")
    try:
        check_number("tile", tile)
        counts = {split: check_number(f"{split} samples", samples[split], COUNT_LIMIT) for split in SPLITS}
    except (ConfigError, KeyError, TypeError) as exc:
        raise DataError(f"its description of {district} is malformed ({str(exc)[:120]})") from None
    fingerprint = info.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or len(fingerprint) > 100):
        raise DataError(f"its description of {district} has a malformed fingerprint")
    return {"district": district, "tile": tile, "samples": counts, "fingerprint": fingerprint}



def evaluation_metrics(metrics) -> dict:
    """A node's evaluation metrics as the server records them: finite numbers, loss and f1 present."""
    clean = clean_metrics(metrics)
    for key in ("loss", "f1"):
        if not isinstance(clean.get(key), (int, float)) or isinstance(clean.get(key), bool):
            raise DataError(f"its metrics lack a finite '{key}'")
    for key in ("samples", "pack_samples"):
        if key in clean:
            clean[key] = check_number(key, clean[key], COUNT_LIMIT)
    return clean

