"""Bytes on the wire: client updates sent compressed as the difference to the global model they started from, and
the global model broadcast in float32 or float16.

    payload = encode(delta, "int8")           # {"manifest": JSON-able dict, "arrays": name -> NumPy array}
    delta = decode(payload, reference)        # validated: DataError in one line for a malformed payload

Modes (`--compress`): none (the weights as today), fp16 (the delta in float16), int8 (the delta in int8 with one
float32 scale per block of BLOCK values: the error of a value is at most half its block's scale), int8-ef (int8 with
error feedback: what a round's quantisation left out is added to the next round's delta, so over rounds nothing is
lost; the residual is client state, kept like the optimiser's). BatchNorm running statistics and tensors of fewer
than SMALL values travel as float32 deltas (exact; they are a tiny share of the bytes). A payload is plain arrays and
a JSON manifest of a few dozen bytes (format, version, mode, block): it crosses processes and Flower without
pickling. Which tensors travel, their shapes and encodings follow from the model the receiver holds (its
reference), so the manifest does not repeat them: each tensor is one array under its name (v.NAME: float32 or
float16) or two (q.NAME int8 values, s.NAME float32 scales), and anything else is refused.

The server adds a decoded delta to its own float32 global model (not to the rounded copy a float16 broadcast sent),
so a float16 broadcast never rounds the global model itself.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from nfed.common import strict_json
from nfed.common.backend import to_numpy
from nfed.common.errors import DataError
from nfed.federation.aggregator import is_statistic

COMPRESS_MODES = ("none", "fp16", "int8", "int8-ef")
BROADCAST_MODES = ("fp32", "fp16")
COMPRESS_KEY = "compress"        # in a round's set-up: how the client sends its update (absent: none)
FORMAT = "nfed-delta"
VERSION = 2                      # 1 listed every tensor's name, shape and encoding in the manifest (3 % of an int8
                                 # update at the demo's width), all of which the receiver's model already fixes
BLOCK = 4096                     # values per int8 scale (4 bytes of scale per 4 KiB of int8: 0.1 %)
SMALL = 256                      # tensors with fewer values travel as float32
MANIFEST_SLACK_BYTES = 1 << 20   # the manifest's JSON on top of the arrays
_LOSSY = {"fp16": "float16", "int8": "int8"}   # a wire mode's encoding of the tensors not kept exact


def _kept_exact(name: str, size: int) -> bool:
    """BatchNorm statistics and small tensors travel as float32."""
    return is_statistic(name) or size < SMALL


def _blocks(size: int, block: int) -> int:
    return max(1, math.ceil(size / block))


def encode(delta: Mapping[str, object], mode: str, block: int = BLOCK) -> dict:
    """The payload of a delta (name -> floating array) under `mode` (fp16, int8 or int8-ef)."""
    if mode not in ("fp16", "int8", "int8-ef"):
        raise DataError(f"cannot encode an update as {str(mode)[:20]!r}")
    arrays = {}
    for name, value in delta.items():
        array = np.asarray(to_numpy(value), dtype=np.float32)
        flat = array.ravel()
        if _kept_exact(name, array.size):
            arrays[f"v.{name}"] = flat.copy()
        elif mode == "fp16":
            arrays[f"v.{name}"] = flat.astype(np.float16)
        else:
            padded = np.zeros(_blocks(flat.size, block) * block, np.float32)
            padded[:flat.size] = flat
            blocks = padded.reshape(-1, block)
            scales = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32)
            safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
            quantised = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
            arrays[f"q.{name}"] = quantised.ravel()[:flat.size]
            arrays[f"s.{name}"] = scales
    manifest = {"format": FORMAT, "version": VERSION, "mode": "int8" if mode == "int8-ef" else mode,
                "block": int(block)}
    return {"manifest": manifest, "arrays": arrays}


def payload_bytes(payload: Mapping) -> int:
    """Bytes a payload puts on the wire: its arrays and its manifest's JSON."""
    return int(sum(int(a.nbytes) for a in payload["arrays"].values())) + len(manifest_text(payload["manifest"]))


def manifest_text(manifest) -> bytes:
    return strict_json.dumps(manifest, sort_keys=True).encode("utf-8")


def decode(payload, reference: Mapping[str, object], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The delta a payload carries, name -> array of the reference's dtype; DataError (one line) unless it holds
    exactly the arrays the reference's tensors need under its mode (names, dtypes, sizes), every value finite, and
    nothing else."""
    try:
        return _decode(payload, reference, max_bytes)
    except DataError as exc:
        raise DataError(f"malformed compressed update: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise DataError(f"malformed compressed update ({type(exc).__name__}: {str(exc)[:160]})") from None


def _decode(payload, reference: Mapping[str, object], max_bytes: int | None) -> dict[str, np.ndarray]:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("manifest"), Mapping) \
            or not isinstance(payload.get("arrays"), Mapping):
        raise DataError("not a manifest and arrays")
    manifest, arrays = payload["manifest"], payload["arrays"]
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"format {str(manifest.get('format'))[:20]!r} version {str(manifest.get('version'))[:8]}")
    mode, block = manifest.get("mode"), manifest.get("block")
    if mode not in ("fp16", "int8"):
        raise DataError(f"mode {str(mode)[:20]!r}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1 << 24:
        raise DataError(f"block {str(block)[:20]!r}")
    if max_bytes is not None and payload_bytes(payload) > max_bytes:
        raise DataError(f"{payload_bytes(payload)} bytes exceed the model's {max_bytes}")
    if set(manifest) != {"format", "version", "mode", "block"}:
        raise DataError("manifest fields other than format, version, mode and block")
    used, delta = set(), {}
    for name, ref in reference.items():
        shape = tuple(ref.shape)
        size = int(np.prod(shape, dtype=np.int64))
        encoding = "float32" if _kept_exact(name, size) else _LOSSY[mode]
        if encoding == "int8":
            values, scales = _array(arrays, f"q.{name}", np.int8, size), \
                _array(arrays, f"s.{name}", np.float32, _blocks(size, block))
            if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
                raise DataError(f"{name} has scales that are negative or not finite")
            used.update((f"q.{name}", f"s.{name}"))
            value = (values.astype(np.float32) * np.repeat(scales, block)[:size]).reshape(shape)
        else:
            values = _array(arrays, f"v.{name}", np.dtype(encoding), size)
            used.add(f"v.{name}")
            value = values.astype(np.float32).reshape(shape)
        if not bool(np.all(np.isfinite(value))):
            raise DataError(f"{name} holds NaN or infinite values")
        delta[name] = value.astype(ref.dtype, copy=False)
    extra = [key for key in arrays if key not in used]
    if extra:
        raise DataError(f"{len(extra)} unexpected array(s), e.g. {str(extra[0])[:60]}")
    return {name: delta[name] for name in reference}


def _array(arrays: Mapping, key: str, dtype, size: int) -> np.ndarray:
    array = arrays.get(key)
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1 or array.size != size:
        shown = f"{array.dtype}[{array.size}]" if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{key[:80]} is {shown}, expected {np.dtype(dtype)}[{size}]")
    return array


def delta_of(weights: Mapping[str, object], start: Mapping[str, object]) -> dict[str, np.ndarray]:
    """weights - start, in float32, per name of `weights`."""
    return {name: np.asarray(to_numpy(value), np.float32) - np.asarray(to_numpy(start[name]), np.float32)
            for name, value in weights.items()}


def apply_delta(reference: Mapping[str, object], delta: Mapping[str, object]) -> dict[str, np.ndarray]:
    """reference + delta with the reference's dtypes (the client's model as the server rebuilds it)."""
    return {name: (np.asarray(ref, np.float64) + np.asarray(delta[name], np.float64)).astype(ref.dtype)
            for name, ref in reference.items()}


class ErrorFeedback:
    """int8 with error feedback: the residual (what quantisation left out) joins the next delta."""

    def __init__(self, residual: Mapping[str, object] | None = None):
        self.residual = {name: np.asarray(value, np.float32) for name, value in (residual or {}).items()}

    def encode(self, delta: Mapping[str, object], block: int = BLOCK) -> dict:
        corrected = {name: np.asarray(value, np.float32) + self.residual.get(name, 0.0)
                     for name, value in delta.items()}
        payload = encode(corrected, "int8", block)
        sent = decode(payload, corrected)
        self.residual = {name: corrected[name] - sent[name] for name in corrected}
        return payload


def compress_update(weights: Mapping[str, object], start: Mapping[str, object], mode: str,
                    residual: Mapping[str, object] | None = None) -> tuple[dict, dict | None]:
    """A client's payload for its trained `weights` (those it sends) started from `start`, and under int8-ef its
    new residual (None otherwise)."""
    delta = delta_of(weights, start)
    if mode == "int8-ef":
        for name, value in (residual or {}).items():
            if name not in delta or np.shape(value) != delta[name].shape:
                raise DataError(f"the error-feedback residual's {str(name)[:80]} does not fit the model")
        feedback = ErrorFeedback(residual)
        return feedback.encode(delta), feedback.residual
    return encode(delta, mode), None


def broadcast(weights: Mapping[str, object], mode: str) -> dict:
    """The global weights as a client receives them: under fp16 every floating tensor but the BatchNorm statistics
    and small ones rounded through float16 (sent as float16; what `received` turns back into float32)."""
    if mode == "fp32":
        return weights
    return {name: value.astype(np.float16) if _rounded(name, value) else value for name, value in weights.items()}


def _rounded(name: str, value) -> bool:
    return getattr(value, "dtype", None) == np.float32 and not _kept_exact(name, value.size)


def received(weights: Mapping[str, object]) -> dict:
    """Weights received under a float16 broadcast, back in float32 (float16 arrays only; others as they are)."""
    return {name: value.astype(np.float32) if getattr(value, "dtype", None) == np.float16 else value
            for name, value in weights.items()}


def broadcast_bytes(weights: Mapping[str, object], mode: str) -> int:
    """Bytes of the global weights one client receives under `mode`."""
    return int(sum(value.size * (2 if mode == "fp16" and _rounded(name, value) else value.dtype.itemsize)
                   for name, value in weights.items()))


PAPER_VALUES = 67_341_000        # values in the study's model (w 64): 269 MB in float32
UPLINK_BITS_PER_S = 20e6         # an ordinary district office uplink (20 Mbit/s)


def traffic_summary(records, compress: str, broadcast_mode: str) -> dict:
    """summary.json's account of the bytes on the wire: totals up and down, the measured ratios to the float32
    model's bytes, and what one district's round of the study's model would take at 20 Mbit/s at those ratios."""
    ups = [e["bytes_up"] for r in records for e in r.get("clients", {}).values() if e.get("bytes_up")]
    downs = [e["bytes_down"] for r in records for e in r.get("clients", {}).values() if e.get("bytes_down")]
    model = next((r["shared_bytes"] for r in reversed(records) if r.get("shared_bytes")), None)
    summary = {"compress": compress, "broadcast": broadcast_mode, "bytes_up": int(sum(ups)),
               "bytes_down": int(sum(downs)), "model_bytes": model}
    if model and ups and downs:
        up, down = sum(ups) / len(ups) / model, sum(downs) / len(downs) / model
        paper = PAPER_VALUES * 4 * 8 / UPLINK_BITS_PER_S
        summary.update(upload_ratio=round(up, 4), download_ratio=round(down, 4),
                       paper_round_seconds_20mbit=round((up + down) * paper, 1))
    return summary
