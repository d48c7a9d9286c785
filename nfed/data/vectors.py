"""Change regions as files GIS tools and nfed read: GeoJSON, nfed label JSON and a per-image summary CSV.

GeoJSON keeps everything (type, confidence, pixels, area; holes); coordinates are map coordinates with a
legacy `crs` member (which GDAL/QGIS read) when the input raster was georeferenced, else pixel edges (x right,
y down). The label JSON follows data/label_schema.json so a reviewed prediction packs as a training label;
that schema knows only the four change types, so a 2-class model's regions are written there as "new" (its
`source` says so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.common.csvtable import csv_cell, csv_text
from nfed.data.labels import label_document, parse_label
from nfed.data.polygons import UNTYPED, ChangeRegion, label_outlines, require_shapely, summarise

SUMMARY_COLUMNS = ("image", "type", "count", "pixels", "area")


@dataclass(frozen=True)
class Georeference:
    """Where pixels lie on the ground: affine (a, b, c, d, e, f) with x = a col + b row + c,
    y = d col + e row + f (rasterio/GDAL order) and the CRS as a name GDAL reads (e.g. EPSG URN)."""

    transform: tuple[float, float, float, float, float, float]
    crs: str | None

    @property
    def pixel_area(self) -> float:
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)


def geojson_document(regions: list[ChangeRegion], *, name: str, georeference: Georeference | None = None,
                     extra: dict | None = None) -> dict:
    """A GeoJSON FeatureCollection of the regions (RFC 7946 ring orientation in the output coordinates)."""
    shapely = require_shapely()
    from shapely.geometry import mapping
    from shapely.geometry.polygon import orient

    pixel_area = georeference.pixel_area if georeference else 1.0
    features = []
    for number, region in enumerate(regions, start=1):
        geometry = region.geometry
        if georeference is not None:
            a, b, c, d, e, f = georeference.transform
            geometry = shapely.affinity.affine_transform(geometry, [a, b, d, e, c, f])
        geometry = shapely.MultiPolygon([orient(p) for p in geometry.geoms]) \
            if geometry.geom_type == "MultiPolygon" else orient(geometry)
        features.append({"type": "Feature", "id": number, "geometry": mapping(geometry),
                         "properties": {"type": region.type, "confidence": round(region.confidence, 4),
                                        "pixels": region.pixels, "area": region.pixels * pixel_area}})
    document = {"type": "FeatureCollection", "name": name}
    if georeference is not None and georeference.crs:
        document["crs"] = {"type": "name", "properties": {"name": georeference.crs}}
    document["nfed"] = {"coordinates": "map" if georeference else "pixel edges, x right, y down",
                        "summary": summarise(regions, pixel_area), **(extra or {})}
    document["features"] = features
    return document


def label_json_document(regions: list[ChangeRegion], *, label_path: Path, past: Path, current: Path,
                        width: int, height: int, district: str, source: str) -> dict:
    """nfed label JSON of the regions (image paths relative to the label file), validated by parse_label."""
    folder = Path(label_path).parent
    untyped = any(region.type == UNTYPED for region in regions)
    changes = [("new" if region.type == UNTYPED else region.type, outline)
               for region in regions for outline in label_outlines(region)]
    if untyped:
        source += "; 2-class model: change types unknown, written as 'new'"
    document = label_document(Path(label_path).stem, district, os.path.relpath(past, folder),
                              os.path.relpath(current, folder), width, height, changes, source=source)
    parse_label(document, label_path)       # a document that would not pack back is a bug: fail loudly here
    return document


def summary_rows(image: str, regions: list[ChangeRegion], pixel_area: float = 1.0) -> list[dict]:
    """One row per change type present: image, type, count, pixels, area."""
    return [{"image": image, "type": kind, **values} for kind, values in summarise(regions, pixel_area).items()]


def write_geojson(path: str | os.PathLike, document: dict) -> None:
    write_json_atomic(path, document, indent=None)


def write_label_json(path: str | os.PathLike, document: dict) -> None:
    write_json_atomic(path, document)


def write_summary_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """The per-image summary as CSV (SUMMARY_COLUMNS), written atomically; an image name a spreadsheet would run
    as a formula is written as text (csv_cell)."""
    number = {"area": lambda area: f"{area:.6g}"}
    cells = ([csv_cell(row[column], number.get(column, str)) for column in SUMMARY_COLUMNS] for row in rows)
    write_text_atomic(path, csv_text(SUMMARY_COLUMNS, cells))
