"""The JSON label format of one tile (data/label_schema.json): validation and rasterisation to a mask.

The schema file is the single source of truth: `validate_schema` interprets the subset of JSON Schema
(draft-07) that the file uses, because jsonschema is not a runtime dependency. On top of the schema,
`parse_label` checks what a schema cannot say: every polygon point lies inside the tile.
Errors are one line that names the file and the offending field path, e.g.
"labels/0007.json: changes[2].type: 'built' is not one of new, demolished, renewed, recoloured".
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nfed.common import strict_json
from nfed.common.errors import DataError
from nfed.common.resources import data_file

# Mask values: 0 = no change, then these types in this order (1..4).
CHANGE_TYPES = ("new", "demolished", "renewed", "recoloured")
CHANGE_CODES = {name: code for code, name in enumerate(CHANGE_TYPES, start=1)}

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}
# Keywords that only document; everything else must be understood or the schema is rejected.
_ANNOTATIONS = {"$schema", "$id", "title", "description", "$comment", "default", "examples"}
_SUPPORTED = {"type", "required", "properties", "additionalProperties", "enum", "items", "minItems",
              "maxItems", "minimum", "maximum", "minLength"} | _ANNOTATIONS


class SchemaViolation(ValueError):
    """A value breaks the schema at `field_path` (JSON path like changes[2].type)."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path or '(root)'}: {message}")
        self.field_path = field_path
        self.message = message


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def show_json(value: Any) -> str:
    """A value of a JSON document as at most 40 characters for messages (strings quoted as Python does)."""
    try:
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def validate_schema(value: Any, schema: dict, path: str = "") -> None:
    """Raise SchemaViolation at the first place `value` breaks `schema` (subset of JSON Schema draft-07)."""
    unknown = set(schema) - _SUPPORTED
    if unknown:
        raise ValueError(f"schema keyword(s) not supported by nfed's validator: {', '.join(sorted(unknown))}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_JSON_TYPES[t](value) for t in types):
            raise SchemaViolation(path, f"{show_json(value)} is not of type {' or '.join(types)}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaViolation(path, f"{show_json(value)} is not one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not strict_json.is_finite_number(value):
            raise SchemaViolation(path, f"{show_json(value)} is not a finite number")
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(path, f"{value} is less than the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(path, f"{value} is greater than the maximum {schema['maximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        raise SchemaViolation(path, "must not be empty" if schema["minLength"] == 1
                              else f"is shorter than {schema['minLength']} characters")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaViolation(_child(path, name), "required field is missing")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                validate_schema(item, properties[name], _child(path, name))
            elif extra is False:
                raise SchemaViolation(_child(path, name), "unknown field")
            elif isinstance(extra, dict):
                validate_schema(item, extra, _child(path, name))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise SchemaViolation(path, f"has {len(value)} item(s), needs at least {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaViolation(path, f"has {len(value)} item(s), allows at most {schema['maxItems']}")
        if "items" in schema:
            items = schema["items"]
            if items.keys() <= {"type", "minimum"} and items.get("type") == "number":
                # fast path for coordinate lists (most of a label's values); errors via the general path
                minimum = items.get("minimum", -math.inf)
                if all(strict_json.is_finite_number(v) and v >= minimum for v in value):
                    return
            for index, item in enumerate(value):
                validate_schema(item, items, _child(path, index))


@functools.lru_cache(maxsize=1)
def label_schema() -> dict:
    """The shipped label schema (data/label_schema.json)."""
    return json.loads(data_file("label_schema.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Change:
    """One changed building: its type (one of CHANGE_TYPES) and outline [(x, y), ...] in pixels."""

    type: str
    polygon: tuple[tuple[float, float], ...]

    @property
    def code(self) -> int:
        return CHANGE_CODES[self.type]


@dataclass(frozen=True)
class Label:
    """The parsed JSON label of one tile; image paths are resolved against the JSON file's folder."""

    path: Path
    tile_id: str
    district: str
    past: Path
    current: Path
    width: int
    height: int
    changes: tuple[Change, ...] = field(default_factory=tuple)
    source: str | None = None
    split: str | None = None


def parse_label(document: Any, path: str | Path) -> Label:
    """Validate a decoded label against the schema and the tile bounds; DataError names file and field."""
    path = Path(path)
    try:
        validate_schema(document, label_schema())
    except SchemaViolation as exc:
        raise DataError(f"{path}: {exc}") from None
    width, height = int(document["size"]["width"]), int(document["size"]["height"])
    changes = []
    for index, change in enumerate(document["changes"]):
        for point_index, (x, y) in enumerate(change["polygon"]):
            if x > width or y > height:
                raise DataError(f"{path}: changes[{index}].polygon[{point_index}]: point ({x:g}, {y:g}) "
                                f"lies outside the {width}x{height} tile")
        polygon = tuple((float(x), float(y)) for x, y in change["polygon"])
        changes.append(Change(change["type"], polygon))
    return Label(path=path, tile_id=document["tile_id"], district=document["district"],
                 past=path.parent / document["images"]["past"],
                 current=path.parent / document["images"]["current"],
                 width=width, height=height, changes=tuple(changes), source=document.get("source"),
                 split=document.get("split"))


def read_label(path: str | Path) -> Label:
    """Read and validate one label file (DataError on missing file, bad or too deeply nested JSON, schema
    violation)."""
    path = Path(path)
    return parse_label(strict_json.read_file(path), path)


def label_document(tile_id: str, district: str, past: str, current: str, width: int, height: int,
                   changes: list[tuple[str, list[tuple[float, float]]]], source: str | None = None,
                   split: str | None = None) -> dict:
    """Build a schema-conforming label document (the inverse of parse_label)."""
    document = {
        "tile_id": tile_id,
        "district": district,
        "images": {"past": past, "current": current},
        "size": {"width": int(width), "height": int(height)},
        "changes": [{"type": kind, "polygon": [[round(float(x), 2), round(float(y), 2)] for x, y in polygon]}
                    for kind, polygon in changes],
    }
    if source is not None:
        document["source"] = source
    if split is not None:
        document["split"] = split
    return document


def rasterise(label: Label) -> np.ndarray:
    """Change mask [height, width] uint8: 0 = no change, else the change type's code (later polygons win).

    Pillow fills a polygon including its outline, with vertices at pixel centres; nfed's synthetic
    generator uses the same call, so its masks and labels agree exactly.
    """
    return rasterise_polygons(label.width, label.height, [(c.code, c.polygon) for c in label.changes])


def rasterise_polygons(width: int, height: int, polygons) -> np.ndarray:
    """Fill (code, [(x, y), ...]) polygons in order into a uint8 mask of the given size."""
    image = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(image)
    for code, polygon in polygons:
        draw.polygon([(float(x), float(y)) for x, y in polygon], fill=int(code))
    return np.asarray(image, dtype=np.uint8).copy()
