"""Overlay PNG for reviewers: the current image with every change region outlined in its type's colour and a
legend (type, colour, count) in the top-left corner.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies); each outline
has a dark halo so it stays visible on bright roofs and dark shadows alike.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nfed.common.atomic import atomic_path
from nfed.data.labels import CHANGE_TYPES
from nfed.data.polygons import UNTYPED, ChangeRegion, polygons_of

TYPE_COLOURS = {"new": (0, 158, 115), "demolished": (213, 94, 0), "renewed": (0, 114, 178),
                "recoloured": (204, 121, 167), UNTYPED: (230, 159, 0)}
HALO = (0, 0, 0)
LEGEND_BACKGROUND = (255, 255, 255)


def render_overlay(current: np.ndarray, regions: list[ChangeRegion], *, scale: float = 1.0, typed: bool = True,
                   legend: bool = True) -> Image.Image:
    """The current image [H, W, 3] uint8 with region outlines (pixel-edge coordinates x `scale`) and legend."""
    image = Image.fromarray(np.asarray(current, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 256))
    for region in regions:
        for polygon in polygons_of(region.geometry):
            for ring in (polygon.exterior, *polygon.interiors):
                points = [(x * scale, y * scale) for x, y in ring.coords]
                draw.line(points, fill=HALO, width=width + 2, joint="curve")
                draw.line(points, fill=TYPE_COLOURS[region.type], width=width, joint="curve")
    if legend:
        kinds = CHANGE_TYPES if typed else (UNTYPED,)
        counts = {kind: sum(region.type == kind for region in regions) for kind in kinds}
        _draw_legend(draw, counts, max(11, min(image.size) // 40))
    return image


def _draw_legend(draw: ImageDraw.ImageDraw, counts: dict[str, int], font_size: int) -> None:
    font = ImageFont.load_default(size=font_size)
    swatch, pad = font_size, max(3, font_size // 3)
    lines = [f"{kind} ({count})" for kind, count in counts.items()]
    text_width = max(draw.textlength(line, font=font) for line in lines)
    box_width = pad * 3 + swatch + int(text_width)
    box_height = pad + len(lines) * (swatch + pad)
    draw.rectangle([0, 0, box_width, box_height], fill=LEGEND_BACKGROUND, outline=HALO)
    for row, (kind, line) in enumerate(zip(counts, lines)):
        top = pad + row * (swatch + pad)
        draw.rectangle([pad, top, pad + swatch, top + swatch], fill=TYPE_COLOURS[kind], outline=HALO)
        draw.text((pad * 2 + swatch, top), line, fill=HALO, font=font)


def write_overlay(path: str | os.PathLike, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
