"""`nfed pack`'s third input format: GeoTIFF pairs with vector labels (GeoJSON), through nfed[geo].

Layout, as LEVIR-CD's: A/<stem>.tif (past), B/<stem>.tif (current), label/<stem>.geojson, in SRC or in one
sub-folder per district (or assigned by --district-map). The GeoJSON holds the changed buildings as Polygon or
MultiPolygon features with an optional `type` property (new, demolished, renewed, recoloured; absent or
"change" = untyped, mask value 1). Coordinates are in the CRS named by the legacy `crs` member (as GDAL/QGIS
and `nfed predict --polygons` write it), else lon/lat (RFC 7946); rasterio reprojects them to the rasters'
CRS. Tiles are read by window and their masks burnt per window (pixels whose centre lies inside a polygon),
so no raster is ever held in memory whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nfed.common import strict_json
from nfed.common.errors import DataError
from nfed.data.geo import RasterPair, open_raster, read_window, require_rasterio
from nfed.data.images import RASTER_SUFFIXES
from nfed.data.labels import CHANGE_CODES, show_json

LABEL_SUFFIXES = (".geojson",)
UNTYPED_VALUES = (None, "change")
RFC7946_CRS = "OGC:CRS84"


def is_geotiff_folder(src: Path) -> bool:
    """True when SRC (or a sub-folder) has A/ with GeoTIFFs and label/ with GeoJSON files."""
    folders = [src] + sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    return any(_has(folder / "A", RASTER_SUFFIXES) and _has(folder / "label", LABEL_SUFFIXES) for folder in folders)


def _has(folder: Path, suffixes) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in suffixes for p in folder.iterdir())


def labels_typed(items) -> bool:
    """Whether any GeoJSON label of these items gives a change type (else the pack's mask is binary)."""
    for item in items:
        for index, feature in enumerate(_features(_read_json(item.label), item.label)):
            if _feature_type(feature, f"{item.label}: features[{index}]") in CHANGE_CODES:
                return True
    return False


def check_geotiff_item(item) -> None:
    """Checks before any pixel is read: rasters readable, 8-bit, on one grid; the GeoJSON valid and on the
    raster. Sets item.size."""
    with RasterPair(item.past, item.current) as pair:
        item.size = (pair.width, pair.height)
        read_label_shapes(item.label, pair.crs, pair.transform, (pair.height, pair.width))


def load_geotiff_item(item) -> tuple["RasterWindows", "RasterWindows", "LabelWindows"]:
    """Lazy past, current and mask arrays that read (or burn) only the window they are sliced with."""
    with open_raster(item.past) as dataset:
        crs, transform, size = dataset.crs, dataset.transform, (dataset.height, dataset.width)
    shapes = read_label_shapes(item.label, crs, transform, size)
    return RasterWindows(item.past, size), RasterWindows(item.current, size), LabelWindows(shapes, transform, size)


class RasterWindows:
    """[H, W, 3] uint8 view of a raster whose 2-D slices are windowed reads (what images.cut_tiles asks for)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, size: tuple[int, int]):
        self.path, self.shape = Path(path), size + (3,)

    def __getitem__(self, key) -> np.ndarray:
        (row_start, row_stop), (col_start, col_stop) = _window(key, self.shape)
        with open_raster(self.path) as dataset:
            return read_window(dataset, row_start, row_stop, col_start, col_stop)


class LabelWindows:
    """[H, W] uint8 mask view whose 2-D slices burn the label shapes into just that window."""

    dtype = np.dtype(np.uint8)

    def __init__(self, shapes: list, transform, size: tuple[int, int]):
        self.shapes, self.transform, self.shape = shapes, transform, size

    def __getitem__(self, key) -> np.ndarray:
        require_rasterio()
        from affine import Affine
        from rasterio.features import rasterize

        (row_start, row_stop), (col_start, col_stop) = _window(key, self.shape)
        out_shape = (row_stop - row_start, col_stop - col_start)
        if not self.shapes or 0 in out_shape:
            return np.zeros(out_shape, np.uint8)
        a, b, c, d, e, f = tuple(self.transform)[:6]
        shifted = Affine(a, b, a * col_start + b * row_start + c, d, e, d * col_start + e * row_start + f)
        return rasterize(self.shapes, out_shape=out_shape, fill=0, dtype="uint8", transform=shifted)


def _window(key, shape) -> list[tuple[int, int]]:
    """(start, stop) of a (rows, cols) slice pair, clipped to the array as NumPy clips."""
    bounds = []
    for part, length in zip(key, shape):
        start, stop, step = part.indices(length)
        if step != 1:
            raise IndexError("windowed views support contiguous slices only")
        bounds.append((start, max(start, stop)))
    return bounds


def read_label_shapes(path: Path, raster_crs, transform, size: tuple[int, int]) -> list[tuple[dict, int]]:
    """(geometry in the raster's CRS, mask value) per feature; DataError naming the file and the feature."""
    require_rasterio()
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform_geom

    document = _read_json(path)
    features = _features(document, path)
    name = _crs_name(document, path)
    try:
        label_crs = CRS.from_user_input(name)
    except CRSError as exc:
        raise DataError(f"{path}: crs '{name}' is not a known CRS ({exc})") from None
    if raster_crs is None and "crs" in document:
        raise DataError(f"{path}: the GeoJSON has a CRS but its rasters have none")
    shapes = []
    bounds = _raster_bounds(transform, size)
    for index, feature in enumerate(features):
        where = f"{path}: features[{index}]"
        kind = _feature_type(feature, where)
        geometry = _polygon_geometry(feature, where)
        outside = DataError(f"{where}: lies outside the raster (coordinates read as {name}; a GeoJSON "
                            "without a crs member is lon/lat)")
        if raster_crs is not None and label_crs != raster_crs:
            try:
                geometry = transform_geom(label_crs, raster_crs, geometry)
            except Exception:       # PROJ refuses points outside the CRS's domain (GDAL's error classes vary)
                raise outside from None
        if not _overlaps(geometry, bounds):
            raise outside
        shapes.append((geometry, CHANGE_CODES.get(kind, 1)))
    return shapes


def _read_json(path: Path) -> dict:
    document = strict_json.read_file(path)
    if not isinstance(document, dict):
        raise DataError(f"{path}: not a GeoJSON object")
    return document


# GeoJSON is checked member by member before rasterio or NumPy sees it: a wrong type is one line naming the
# file and the member, and the checked structure (at most 5 levels of arrays) bounds what the rest walks.

def _features(document: dict, path: Path) -> list:
    features = document.get("features") if document.get("type") == "FeatureCollection" else None
    if not isinstance(features, list):
        raise DataError(f"{path}: not a GeoJSON FeatureCollection")
    return features


def _crs_name(document: dict, path: Path) -> str:
    """The name in the legacy crs member ({"type": "name", "properties": {"name": ...}}), else lon/lat."""
    crs = document.get("crs")
    if crs is None:
        return RFC7946_CRS
    properties = crs.get("properties") if isinstance(crs, dict) else None
    name = properties.get("name") if isinstance(properties, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: crs: {show_json(crs)} names no CRS (expected properties.name, e.g. "
                        "urn:ogc:def:crs:EPSG::32652)")
    return name


def _feature_type(feature, where: str) -> str | None:
    """The feature's change type (None or "change" for untyped); DataError for anything else."""
    if not isinstance(feature, dict):
        raise DataError(f"{where}: not a GeoJSON Feature (an object), got {show_json(feature)}")
    properties = feature.get("properties")
    if properties is None:
        return None
    if not isinstance(properties, dict):
        raise DataError(f"{where}.properties: not an object, got {show_json(properties)}")
    kind = properties.get("type")
    if kind not in UNTYPED_VALUES and not (isinstance(kind, str) and kind in CHANGE_CODES):
        raise DataError(f"{where}.properties.type: {show_json(kind)} is not one of new, demolished, renewed, "
                        "recoloured, change")
    return kind


def _polygon_geometry(feature: dict, where: str) -> dict:
    """The feature's geometry, a Polygon or MultiPolygon whose coordinates have exactly their GeoJSON shape."""
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise DataError(f"{where}.geometry: not a GeoJSON geometry object, got {show_json(geometry)}")
    kind = geometry.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        raise DataError(f"{where}.geometry: {show_json(kind)} is not a Polygon or MultiPolygon")
    where = f"{where}.geometry.coordinates"
    coordinates = geometry.get("coordinates")
    polygons = [(where, coordinates)] if kind == "Polygon" else \
        [(f"{where}[{i}]", polygon) for i, polygon in enumerate(_array(coordinates, where, "polygons"))]
    for polygon_where, polygon in polygons:
        for r, ring in enumerate(_array(polygon, polygon_where, "rings")):
            ring_where = f"{polygon_where}[{r}]"
            if len(_array(ring, ring_where, "positions")) < 4:
                raise DataError(f"{ring_where}: a ring needs at least 4 positions (the last repeats the first), "
                                f"got {len(ring)}")
            for p, position in enumerate(ring):
                if not (isinstance(position, list) and len(position) in (2, 3)
                        and all(strict_json.is_finite_number(value) for value in position)):
                    raise DataError(f"{ring_where}[{p}]: {show_json(position)} is not a position [x, y]")
    return geometry


def _array(value, where: str, of: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of {of}, got {show_json(value)}")
    return value


def _raster_bounds(transform, size: tuple[int, int]) -> tuple[float, float, float, float]:
    height, width = size
    a, b, c, d, e, f = tuple(transform)[:6]
    corners = [(a * col + b * row + c, d * col + e * row + f) for col in (0, width) for row in (0, height)]
    xs, ys = zip(*corners)
    return min(xs), min(ys), max(xs), max(ys)


def _overlaps(geometry: dict, bounds) -> bool:
    points = np.array([p for ring in _rings(geometry) for p in ring], dtype=np.float64).reshape(-1, 2)
    if not len(points):
        return False
    west, south, east, north = bounds
    return (points[:, 0].min() <= east and points[:, 0].max() >= west and
            points[:, 1].min() <= north and points[:, 1].max() >= south)


def _rings(geometry: dict):
    coordinates = geometry.get("coordinates") or []
    polygons = coordinates if geometry["type"] == "MultiPolygon" else [coordinates]
    return [[point[:2] for point in ring] for polygon in polygons for ring in polygon]
