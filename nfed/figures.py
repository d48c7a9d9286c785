"""Bar and line charts drawn with Pillow, enough for the study's figures (no plotting library needed).

`bar_chart` draws grouped bars per category (optionally a second series as points on a right-hand axis);
`line_chart` draws one line per series over a shared x axis. Both write PNG files atomically.
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path

BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)
BAR_COLOURS = ((120, 144, 176), (222, 123, 60), (96, 168, 96), (170, 110, 190))
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 70, 50, 130


def _font():
    return ImageFont.load_default()


def palette(count: int) -> list[tuple[int, int, int]]:
    """`count` distinguishable colours (hues spread around the circle, two lightness levels)."""
    colours = []
    for i in range(count):
        r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, 0.42 if i % 2 else 0.55, 0.75)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def nice_max(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2, 2.5, 5 x 10^k)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exponent >= value:
            return step * exponent
    return 10 * exponent


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _vertical_text(image, xy, text, font, fill=AXIS):
    """Draw text rotated by 90 degrees (reading bottom to top) with its top-right corner near xy."""
    probe = ImageDraw.Draw(image)
    width, height = _text_size(probe, text, font)
    label = Image.new("RGBA", (width + 4, height + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), text, font=font, fill=fill)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (int(xy[0] - rotated.width / 2), int(xy[1])), rotated)


class _Canvas:
    def __init__(self, width: int, height: int, title: str):
        self.image = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = _font()
        self.left, self.top = MARGIN_LEFT, MARGIN_TOP
        self.right, self.bottom = width - MARGIN_RIGHT, height - MARGIN_BOTTOM
        w, _ = _text_size(self.draw, title, self.font)
        self.draw.text(((width - w) / 2, 15), title, font=self.font, fill=AXIS)

    def y_of(self, value: float, y_max: float) -> float:
        return self.bottom - (self.bottom - self.top) * max(0.0, min(value, y_max)) / y_max

    def y_axis(self, y_max: float, label: str, right: bool = False, ticks: int = 5, grid: bool = True):
        x = self.right if right else self.left
        self.draw.line([(x, self.top), (x, self.bottom)], fill=AXIS)
        for i in range(ticks + 1):
            value = y_max * i / ticks
            y = self.y_of(value, y_max)
            if grid and not right:
                self.draw.line([(self.left + 1, y), (self.right, y)], fill=GRID)
            text = f"{value:g}" if value < 1e4 else f"{value:.0f}"
            w, h = _text_size(self.draw, text, self.font)
            self.draw.text((x + 6 if right else x - w - 6, y - h / 2), text, font=self.font, fill=AXIS)
        _vertical_text(self.image, (x + 50 if right else x - 55, self.top + 40), label, self.font)

    def x_axis(self):
        self.draw.line([(self.left, self.bottom), (self.right, self.bottom)], fill=AXIS)

    def legend(self, entries: Sequence[tuple[str, tuple]], x: float | None = None, y: float | None = None,
               columns: int = 1):
        x0 = self.left + 10 if x is None else x
        y0 = self.top + 5 if y is None else y
        column_width = 130
        for i, (name, colour) in enumerate(entries):
            cx = x0 + (i % columns) * column_width
            cy = y0 + (i // columns) * 13
            self.draw.rectangle([cx, cy + 2, cx + 9, cy + 10], fill=colour)
            self.draw.text((cx + 13, cy), name, font=self.font, fill=AXIS)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            self.image.save(tmp, format="PNG")
        return path


def bar_chart(path: str | Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
              title: str, y_label: str, y_max: float | None = None,
              points: Mapping[str, Sequence[float]] | None = None, points_label: str = "",
              points_max: float | None = None) -> Path:
    """Grouped bars per category; `points` (one series) as dots on a right-hand axis. Writes a PNG."""
    width = max(900, 40 * len(categories) + MARGIN_LEFT + MARGIN_RIGHT)
    canvas = _Canvas(width, 520, title)
    names = list(series)
    values = [v for name in names for v in series[name] if v is not None and math.isfinite(v)]
    y_max = y_max or nice_max(max(values, default=1.0))
    canvas.y_axis(y_max, y_label)
    canvas.x_axis()
    slot = (canvas.right - canvas.left) / max(len(categories), 1)
    bar_width = slot * 0.8 / max(len(names), 1)
    for c, category in enumerate(categories):
        x0 = canvas.left + c * slot + slot * 0.1
        for s, name in enumerate(names):
            value = series[name][c]
            if value is None or not math.isfinite(value):
                continue
            colour = BAR_COLOURS[s % len(BAR_COLOURS)]
            canvas.draw.rectangle([x0 + s * bar_width, canvas.y_of(value, y_max),
                                   x0 + (s + 1) * bar_width - 1, canvas.bottom], fill=colour)
        _vertical_text(canvas.image, (canvas.left + (c + 0.5) * slot, canvas.bottom + 6), category, canvas.font)
    legend = [(name, BAR_COLOURS[s % len(BAR_COLOURS)]) for s, name in enumerate(names)]
    if points:
        (label, pvalues), = points.items()
        finite = [v for v in pvalues if v is not None and math.isfinite(v)]
        p_max = points_max or nice_max(max(finite, default=1.0))
        canvas.y_axis(p_max, points_label or label, right=True)
        colour = (200, 30, 30)
        previous = None
        for c, value in enumerate(pvalues):
            if value is None or not math.isfinite(value):
                previous = None
                continue
            x, y = canvas.left + (c + 0.5) * slot, canvas.y_of(value, p_max)
            if previous:
                canvas.draw.line([previous, (x, y)], fill=colour, width=1)
            canvas.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            previous = (x, y)
        legend.append((label, colour))
    canvas.legend(legend, x=canvas.right - 140)
    return canvas.save(path)


def line_chart(path: str | Path, x_values: Sequence[float], series: Mapping[str, Sequence[float | None]], *,
               title: str, x_label: str, y_label: str, y_max: float | None = None) -> Path:
    """One line per series over shared x values (None values leave gaps). Writes a PNG."""
    legend_rows = math.ceil(len(series) / 5)
    canvas = _Canvas(960, 460 + 13 * legend_rows, title)
    canvas.bottom = canvas.image.height - 60 - 13 * legend_rows
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    y_max = y_max or nice_max(max(values, default=1.0))
    canvas.y_axis(y_max, y_label)
    canvas.x_axis()
    xs = list(x_values)
    x_min, x_max = (min(xs), max(xs)) if xs else (0, 1)
    span = (x_max - x_min) or 1

    def x_of(x):
        return canvas.left + (canvas.right - canvas.left) * (x - x_min) / span

    for x in xs:
        text = f"{x:g}"
        w, _ = _text_size(canvas.draw, text, canvas.font)
        canvas.draw.line([(x_of(x), canvas.bottom), (x_of(x), canvas.bottom + 4)], fill=AXIS)
        canvas.draw.text((x_of(x) - w / 2, canvas.bottom + 6), text, font=canvas.font, fill=AXIS)
    w, _ = _text_size(canvas.draw, x_label, canvas.font)
    canvas.draw.text(((canvas.left + canvas.right - w) / 2, canvas.bottom + 22), x_label, font=canvas.font,
                     fill=AXIS)
    colours = palette(len(series))
    for colour, (name, ys) in zip(colours, series.items()):
        previous = None
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                previous = None
                continue
            point = (x_of(x), canvas.y_of(y, y_max))
            if previous:
                canvas.draw.line([previous, point], fill=colour, width=2)
            canvas.draw.ellipse([point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2], fill=colour)
            previous = point
    canvas.legend(list(zip(series, colours)), x=canvas.left, y=canvas.bottom + 40, columns=5)
    return canvas.save(path)
