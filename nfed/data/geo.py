"""Georeferenced imagery through rasterio (the optional extra nfed[geo]): GeoTIFF pairs read by window,
masks written as GeoTIFFs with the input's CRS and transform.

Orthophotos are often larger than memory, so nothing here reads a whole raster: prediction asks for bands
of rows (`RasterPair.read_rows`), the overlay for a decimated preview, and the mask is written band by band.
Rasters must be 8-bit with 3 or more bands (bands 1-3 are taken as RGB) or 1 band (grey, repeated).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

from nfed.common.atomic import atomic_path
from nfed.common.errors import ConfigError, DataError, OutputError
from nfed.data.vectors import Georeference

MASK_BLOCK = 256


def rasterio_available() -> bool:
    return importlib.util.find_spec("rasterio") is not None


def require_rasterio():
    """The rasterio module, or a one-line ConfigError saying how to install it."""
    try:
        import rasterio
    except ImportError:
        raise ConfigError("GeoTIFF input/output needs rasterio: pip install 'nfed[geo]'") from None
    return rasterio


@contextlib.contextmanager
def _quiet_georeference():
    """rasterio warns about rasters without a CRS; nfed treats them as plain pixel grids."""
    rasterio = require_rasterio()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        yield rasterio


def open_raster(path: Path):
    """An open rasterio dataset; DataError naming the file when it is missing or not a raster."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _quiet_georeference() as rasterio:
        try:
            return rasterio.open(path)
        except rasterio.errors.RasterioError as exc:
            raise DataError(f"{path}: unreadable raster ({_gdal_reason(exc)})") from None


def _gdal_reason(exc: BaseException) -> str:
    """GDAL's own words (rasterio chains them as the cause of its generic 'Read failed'), or the OS's."""
    text = (getattr(exc, "strerror", None) or str(exc.__cause__ or exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(dataset, bands: list[int], **options) -> np.ndarray:
    """dataset.read; a damaged raster (cut short, a corrupt block) is one DataError naming it."""
    from rasterio.errors import RasterioError

    try:
        return dataset.read(bands, **options)
    except RasterioError as exc:
        raise DataError(f"{dataset.name}: unreadable raster ({_gdal_reason(exc)})") from None


def raster_size(path: Path) -> tuple[int, int]:
    """(width, height) from the raster's header."""
    with open_raster(path) as dataset:
        return dataset.width, dataset.height


def georeference_of(dataset) -> Georeference | None:
    """The dataset's transform and CRS name, or None for a plain pixel grid (no CRS, identity transform)."""
    transform = tuple(float(v) for v in tuple(dataset.transform)[:6])
    if dataset.crs is None and transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        return None
    return Georeference(transform, crs_name(dataset.crs))


def crs_name(crs) -> str | None:
    """An EPSG URN (what GeoJSON's legacy crs member and GDAL expect) or the WKT when there is no code."""
    if crs is None:
        return None
    code = crs.to_epsg()
    return f"urn:ogc:def:crs:EPSG::{code}" if code else crs.to_wkt()


class RasterPair:
    """A past/current GeoTIFF pair of one size and georeference, read by window."""

    def __init__(self, past_path: Path, current_path: Path):
        self.paths = (Path(past_path), Path(current_path))
        self.datasets = []
        try:
            for path in self.paths:
                self.datasets.append(open_raster(path))
                _check_rgb(self.datasets[-1], path)
            past, current = self.datasets
            if (past.width, past.height) != (current.width, current.height):
                raise DataError(f"{self.paths[0]} is {past.width}x{past.height} but {self.paths[1]} is "
                                f"{current.width}x{current.height}: the two dates must have the same size")
            if past.crs != current.crs or past.transform != current.transform:
                raise DataError(f"{self.paths[0]} and {self.paths[1]} differ in CRS or transform: "
                                "resample one onto the other's grid first")
        except BaseException:
            self.close()
            raise
        self.height, self.width = past.height, past.width
        self.crs, self.transform = past.crs, past.transform
        self.georeference = georeference_of(past)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of both dates as [rows, W, 3] uint8, read by window."""
        return tuple(read_window(dataset, start, stop, 0, self.width) for dataset in self.datasets)

    def current_preview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The current date decimated to at most max_side pixels a side (GDAL reads it block by block)."""
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        dataset = self.datasets[1]
        bands = _rgb_bands(dataset)
        data = _read(dataset, bands, out_shape=(len(bands),) + shape, resampling=Resampling.average)
        return _as_rgb(data), shape[1] / self.width

    def close(self) -> None:
        for dataset in self.datasets:
            dataset.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _check_rgb(dataset, path: Path) -> None:
    if dataset.count == 2:
        raise DataError(f"{path}: {dataset.count} bands; nfed needs RGB (3 or more bands) or 1 grey band")
    dtype = dataset.dtypes[0]
    if dtype != "uint8":
        raise DataError(f"{path}: pixels are {dtype}; nfed needs 8-bit imagery (rescale first, e.g. "
                        "gdal_translate -ot Byte -scale)")


def read_window(dataset, row_start: int, row_stop: int, col_start: int, col_stop: int) -> np.ndarray:
    """Pixels [row_start:row_stop, col_start:col_stop] of an open raster as [rows, cols, 3] uint8."""
    from rasterio.windows import Window

    window = Window(col_start, row_start, col_stop - col_start, row_stop - row_start)
    return _as_rgb(_read(dataset, _rgb_bands(dataset), window=window))


def _rgb_bands(dataset) -> list[int]:
    return [1] if dataset.count == 1 else [1, 2, 3]


def _as_rgb(bands: np.ndarray) -> np.ndarray:
    """[bands, H, W] -> [H, W, 3] (one grey band repeated)."""
    if bands.shape[0] == 1:
        bands = np.repeat(bands, 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1))


@contextlib.contextmanager
def mask_raster_writer(path: Path, pair):
    """Yield write(first_row, classes) that puts 0/255 rows into a new one-band GeoTIFF (tiled, deflate) with
    the pair's CRS and transform. It is written to a temporary file, checked complete, then renamed to `path`:
    a failed write (disk full, file size limit) is one OutputError naming `path` and leaves no file."""
    with _quiet_georeference() as rasterio:
        from rasterio.windows import Window

        profile = {"driver": "GTiff", "height": pair.height, "width": pair.width, "count": 1, "dtype": "uint8",
                   "crs": getattr(pair, "crs", None), "tiled": True, "blockxsize": MASK_BLOCK,
                   "blockysize": MASK_BLOCK, "compress": "deflate"}
        if getattr(pair, "transform", None) is not None:
            profile["transform"] = pair.transform
        with atomic_path(path, suffix=".tif") as tmp:
            target = _gdal_write(path, lambda: rasterio.open(tmp, "w", **profile))
            try:
                def write_rows(first_row: int, classes: np.ndarray) -> None:
                    window = Window(0, first_row, pair.width, classes.shape[0])
                    rows = np.where(classes > 0, 255, 0).astype(np.uint8)[None]
                    _gdal_write(path, lambda: target.write(rows, window=window))

                yield write_rows
            except BaseException:
                with contextlib.suppress(Exception):
                    target.close()
                raise
            _gdal_write(path, target.close)
            _check_complete(tmp, path, pair.height, pair.width)


def _gdal_write(path: Path, step):
    """Run one GDAL write step; its failure is an OutputError naming the output."""
    from rasterio.errors import RasterioError

    try:
        return step()
    except (RasterioError, OSError) as exc:
        raise OutputError(f"{path}: cannot write ({_gdal_reason(exc)})") from None


def _check_complete(written: Path, path: Path, height: int, width: int) -> None:
    """GDAL reports some failed writes only on stderr (libtiff's 'File too large' when the disk fills while the
    file is closed): re-open the file and check its width, height and that every block's bytes lie inside it."""
    import rasterio

    try:
        with rasterio.open(written) as dataset:
            complete = (dataset.height, dataset.width) == (height, width) and \
                _blocks_inside(dataset, os.path.getsize(written))
    except (rasterio.errors.RasterioError, ValueError):
        complete = False
    if not complete:
        raise OutputError(f"{path}: cannot write (the GeoTIFF on disk is incomplete: is the disk full, or is "
                          "there a file size limit?)")


def _blocks_inside(dataset, file_size: int) -> bool:
    """Whether every block of band 1 has its bytes in the file (GDAL's TIFF metadata: offset and size)."""
    for row in range(-(-dataset.height // MASK_BLOCK)):
        for col in range(-(-dataset.width // MASK_BLOCK)):
            offset = int(dataset.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1) or 0)
            size = int(dataset.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1) or 0)
            if offset <= 0 or size <= 0 or offset + size > file_size:
                return False
    return True
