"""Image files and tiles, shared by packing, synthesis and prediction: decoding (Pillow), a fast PNG encoder,
cutting images into grid tiles, and the tile -> model input conversion every reader of tiles uses.

Decoding yields 8 bits a sample. 16-bit greys (PNG, TIFF) keep their high byte (value >> 8), as Pillow itself
does for 16-bit RGB and RGBA PNGs; a 16-bit label marks change at >= 32768. Floats and 32-bit integers are
refused, never clipped. An image that declares more pixels than `pixel_budget` is refused from its header,
before any pixel is decoded (a decompression bomb is a few kilobytes that decode into gigabytes).
"""
from __future__ import annotations

import contextlib
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from nfed.common.errors import DataError
from nfed.common.memory import memory_limit_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RASTER_SUFFIXES = (".tif", ".tiff")   # GeoTIFFs: read by window through rasterio (nfed.data.geo) when installed
MAX_PIXELS = 89_478_485               # Pillow's decompression-bomb limit: about 0.25 GiB as RGB
DECODED_BYTES_PER_PIXEL = 16          # a pair decoded for packing: two RGB images, the mask, Pillow's buffers
EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
LABEL_CHANGE_16 = 32768               # a 16-bit label's change threshold: 128 << 8


def list_images(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """The image files of a folder (by suffix, any case; hidden files left out), sorted by name; [] without it."""
    if not folder.is_dir():
        return []
    return [path for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith(".")]


def pixel_budget(tile: int = 0) -> int:
    """The most pixels an image may declare to be decoded whole: Pillow's bomb limit, lowered to what this
    machine's memory holds, never below one tile."""
    limit = memory_limit_bytes()
    budget = MAX_PIXELS if limit is None else min(MAX_PIXELS, limit // DECODED_BYTES_PER_PIXEL)
    return max(budget, tile * tile)


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image at `path`, open, its header within `max_pixels`; any failure while opening or decoding it
    becomes one DataError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # nfed's own budget applies
            image = Image.open(path)
        with image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise DataError(f"{path}: image too large to decode ({image.width}x{image.height} pixels; nfed "
                                f"decodes at most {max_pixels:,} at once here: cut it into smaller files)")
            yield image
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to decode ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def _sixteen_bit(image: Image.Image) -> np.ndarray | None:
    """The samples of a 16-bit grey image as uint16 (None for other modes); old Pillows open such PNGs as I."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        return np.asarray(image).astype(np.uint16)
    return None


def _eight_bit(image: Image.Image, path: Path) -> Image.Image:
    """The image with 8 bits a sample (16-bit greys: value >> 8); DataError for modes it cannot take."""
    if image.mode in EIGHT_BIT_MODES:
        return image
    samples = _sixteen_bit(image)
    if samples is not None:
        return Image.fromarray((samples >> 8).astype(np.uint8), "L")
    shown = {"I": "32-bit integers", "F": "32-bit floats"}.get(image.mode, f"of mode {image.mode}")
    raise DataError(f"{path}: pixels are {shown}; nfed needs 8-bit images (rescale first, e.g. "
                    "gdal_translate -ot Byte -scale)")


def read_rgb(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image as [H,W,3] uint8 (RGBA/greyscale/palette converted, 16-bit scaled); DataError when
    unreadable or larger than `max_pixels` (default: pixel_budget())."""
    with _opened(path, pixel_budget() if max_pixels is None else max_pixels) as image:
        return np.asarray(_eight_bit(image, path).convert("RGB"), dtype=np.uint8)


def read_binary_mask(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode a LEVIR label as [H,W] uint8 with 1 where the grey value is >= 128 (16-bit: >= 32768). A 16-bit
    label whose values stay below 32768 but are not all 0 (0/255 saved as 16-bit) is refused, not read as
    'no change'."""
    with _opened(path, pixel_budget() if max_pixels is None else max_pixels) as image:
        samples = _sixteen_bit(image)
        if samples is not None:
            top = int(samples.max(initial=0))
            if 0 < top < LABEL_CHANGE_16:
                raise DataError(f"{path}: 16-bit label whose values reach only {top}: change must be >= "
                                f"{LABEL_CHANGE_16} (save it as 0/65535, or as an 8-bit 0/255 PNG)")
            return (samples >= LABEL_CHANGE_16).astype(np.uint8)
        grey = np.asarray(_eight_bit(image, path).convert("L"), dtype=np.uint8)
    return (grey >= 128).astype(np.uint8)


def image_size(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the image header without decoding the pixels; DataError above `max_pixels`."""
    with _opened(path, max_pixels) as image:
        return image.size


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """Minimal RGB PNG encoder (Sub filter, fast zlib): ~2-3x faster than Pillow's for small noisy
    tiles, which dominates synthesis time; any PNG reader decodes it."""
    height, width, _ = rgb.shape
    sub = rgb.astype(np.int16)
    sub[:, 1:] -= rgb[:, :-1]
    rows = np.empty((height, 1 + width * 3), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to the left
    rows[:, 1:] = (sub & 255).reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def tile_origins(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """(y, x) top-left corners of the grid tiles: remainders dropped, images smaller than a tile padded."""
    ys = range(0, max(height - tile, 0) + 1, tile)
    xs = range(0, max(width - tile, 0) + 1, tile)
    return [(y, x) for y in ys for x in xs]


def cut_tiles(array: np.ndarray, tile: int, origins: list[tuple[int, int]]) -> list[np.ndarray]:
    """Crop `array` ([H,W] or [H,W,C]) at the origins; zero-pad crops that run past a small image."""
    out = []
    for y, x in origins:
        crop = array[y:y + tile, x:x + tile]
        if crop.shape[0] != tile or crop.shape[1] != tile:
            padded = np.zeros((tile, tile) + array.shape[2:], dtype=array.dtype)
            padded[:crop.shape[0], :crop.shape[1]] = crop
            crop = padded
        out.append(crop)
    return out


def tile_ids(stem: str, width: int, height: int, tile: int, origins: list[tuple[int, int]]) -> list[str]:
    """The stem itself when the image is exactly one tile, else stem_y<row px>_x<col px>."""
    if width == tile and height == tile:
        return [stem]
    return [f"{stem}_y{y:04d}_x{x:04d}" for y, x in origins]


def images_to_nchw_float(images: np.ndarray) -> np.ndarray:
    """[B,H,W,3] uint8 -> [B,3,H,W] float32 in [0, 1] (the model's input, for packed and predicted tiles alike)."""
    out = np.empty((images.shape[0], images.shape[3], images.shape[1], images.shape[2]), np.float32)
    np.multiply(images.transpose(0, 3, 1, 2), np.float32(1 / 255), out=out, casting="unsafe")
    return out
