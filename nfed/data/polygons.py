"""Change regions of a predicted class map as polygons: pixel-exact outlines, simplified, typed and scored.

Tracing: scipy.ndimage.label finds the 4-connected change regions (scipy is a core dependency) and shapely
unites each region's horizontal pixel runs (one rectangle per run) into its outline. That outline is exact
(pixel edges, holes included, valid by construction) and needs only shapely; rasterio.features.shapes (GDAL's
polygonize) gives the same outlines but drags GDAL into plain PNG prediction, and skimage's marching squares
would add a package and give half-pixel outlines whose area is not the pixel count. The tests check the
outlines against rasterio.features.shapes where rasterio is installed.

Coordinates are pixel edges, x right and y down: pixel (col, row) is the square [col, col+1] x [row, row+1],
so an unsimplified outline's area is its pixel count and a raster's affine geotransform maps it to map
coordinates unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nfed.common.errors import ConfigError
from nfed.data.labels import CHANGE_TYPES

UNTYPED = "change"          # the type of every region of a 2-class model
DEFAULT_MIN_AREA = 16       # pixels; smaller regions (and holes) are dropped (filled)
DEFAULT_SIMPLIFY = 1.0      # pixels; removes the staircase of oblique edges (its corners lie 0.71 px off)
LABEL_INSET = 0.4           # px the label outline is moved inwards, see label_outlines


def require_shapely():
    """The shapely module, or a one-line ConfigError saying how to install it."""
    try:
        import shapely
    except ImportError:
        raise ConfigError("change polygons need shapely: pip install 'nfed[geo]'") from None
    return shapely


@dataclass(frozen=True)
class ChangeRegion:
    """One connected change region: its type, outline (pixel edges), pixel count and mean P(change)."""

    type: str               # one of CHANGE_TYPES, or UNTYPED for a 2-class model
    geometry: object        # shapely Polygon or MultiPolygon in pixel-edge coordinates
    pixels: int
    confidence: float


def change_regions(classes: np.ndarray, change_probability: np.ndarray, *, typed: bool,
                   min_area: int = DEFAULT_MIN_AREA, simplify: float = DEFAULT_SIMPLIFY) -> list[ChangeRegion]:
    """Regions of `classes` > 0 ([H, W]; 1..4 = type codes when `typed`) with at least `min_area` pixels.

    A region's type is the most frequent per-pixel type (the argmax over the four change classes) among its
    pixels; its confidence is the mean of `change_probability` over them. Holes under `min_area` pixels are
    filled; outlines are simplified by `simplify` pixels (Douglas-Peucker, topology kept; 0 keeps every step).
    """
    shapely = require_shapely()
    if min_area < 0 or simplify < 0:
        raise ConfigError(f"min area {min_area} and simplify {simplify} must not be negative")
    regions_map, count = ndimage.label(classes > 0)
    if count == 0:
        return []
    flat = regions_map.ravel()
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    confidence = np.bincount(flat, weights=change_probability.ravel().astype(np.float64),
                             minlength=count + 1)[1:] / sizes
    regions = []
    for number, window in enumerate(ndimage.find_objects(regions_map), start=1):
        if sizes[number - 1] < max(min_area, 1):
            continue
        inside = regions_map[window] == number
        outline = _outline(shapely, inside, window[1].start, window[0].start)
        outline = _drop_small_holes(shapely, outline, min_area)
        if simplify > 0:
            outline = _polygonal(shapely, shapely.make_valid(outline.simplify(simplify, preserve_topology=True)))
        kind = CHANGE_TYPES[_most_frequent(classes[window][inside]) - 1] if typed else UNTYPED
        regions.append(ChangeRegion(kind, outline, int(sizes[number - 1]), float(confidence[number - 1])))
    return regions


def _outline(shapely, inside: np.ndarray, x0: int, y0: int):
    """Union of the pixel runs of one region (`inside` is its bounding box, offset by x0, y0)."""
    edges = np.diff(np.pad(inside.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)          # row-major order pairs each start with its stop
    runs = shapely.box(x0 + starts, y0 + rows, x0 + stops, y0 + rows + 1)
    return shapely.union_all(runs).simplify(0)       # simplify(0) drops the vertices where runs meet


def _drop_small_holes(shapely, polygon, min_area: int):
    holes = [ring for ring in polygon.interiors if shapely.Polygon(ring).area >= min_area]
    return shapely.Polygon(polygon.exterior, holes)


def _polygonal(shapely, geometry):
    """The polygonal part of a geometry (make_valid may return a collection with stray lines)."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts)


def _most_frequent(codes: np.ndarray) -> int:
    return int(np.bincount(codes.ravel(), minlength=len(CHANGE_TYPES) + 1)[1:].argmax()) + 1


def polygons_of(geometry) -> list:
    """The Polygons of a Polygon or MultiPolygon (empty parts dropped)."""
    parts = getattr(geometry, "geoms", [geometry])
    return [part for part in parts if not part.is_empty]


def label_outlines(region: ChangeRegion) -> list[list[tuple[float, float]]]:
    """Outlines in nfed's label convention (data/label_schema.json), one per polygon part, holes dropped.

    Labels are filled by Pillow, which includes the outline and puts vertices at pixel centres; moving the
    pixel-edge outline LABEL_INSET px inwards (mitred, so corners stay corners) makes that fill give back the
    region's pixels (0.5 would collapse one-pixel-wide parts). Labels have no holes, so a region's holes
    come back as change.
    """
    outlines = []
    for part in polygons_of(region.geometry):
        inset = part.buffer(-LABEL_INSET, join_style="mitre")
        for piece in polygons_of(inset):
            outlines.append([(x, y) for x, y in piece.exterior.coords[:-1]])
    return outlines


def summarise(regions: list[ChangeRegion], pixel_area: float = 1.0) -> dict[str, dict]:
    """type -> {count, pixels, area} (area = pixels x pixel_area, in map units where georeferenced)."""
    summary: dict[str, dict] = {}
    for region in regions:
        entry = summary.setdefault(region.type, {"count": 0, "pixels": 0, "area": 0.0})
        entry["count"] += 1
        entry["pixels"] += region.pixels
        entry["area"] += region.pixels * pixel_area
    return summary
