"""Bar, line and scatter charts drawn with Pillow, enough for the study's figures (no plotting library needed).

`bar_chart` draws grouped bars per category (optional interval whiskers, optionally a second series as points
on a right-hand axis); `line_chart` draws one line per series over a shared x axis (thin lines behind a bold
one, vertical markers); `scatter_chart` draws labelled points with error bars and a fitted curve on a log or
linear x axis. All write PNG files atomically.
"""
from __future__ import annotations

import colorsys
import functools
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from nfed.common.atomic import atomic_path

BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)
BOLD = (20, 20, 20)
MARKER = (200, 30, 30)
BAR_COLOURS = ((120, 144, 176), (222, 123, 60), (96, 168, 96), (170, 110, 190))
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 70, 50, 130
# Pillow's default font at its 10 px default draws a 2 px space that vanishes between words ("Samplesand").
TEXT_SIZE, TITLE_SIZE = 12, 15
LEGEND_ROW = 16


@functools.lru_cache(maxsize=4)
def _font(size: int = TEXT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):   # Pillow < 10.1 or without FreeType: the bitmap font
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


def nice_range(low: float, high: float, ticks: int = 5) -> tuple[float, float, int]:
    """An axis range [low', high'] around [low, high] cut into round steps (at most ticks + 2 of them), and
    the number of steps."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        low, high = (low, low + 1.0) if math.isfinite(low) else (0.0, 1.0)
    exponent = 10 ** math.floor(math.log10((high - low) / ticks))
    for step in (m * exponent * scale for scale in (1, 10) for m in (0.5, 1, 2, 2.5, 5)):   # the finest that fits
        start, stop = math.floor(low / step) * step, math.ceil(high / step) * step
        if round((stop - start) / step) <= ticks + 2:
            break
    return start, stop, max(1, round((stop - start) / step))


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _vertical_text(image, xy, text, font, fill=AXIS):
    """Draw text rotated by 90 degrees (reading bottom to top) with its top-right corner near xy."""
    probe = ImageDraw.Draw(image)
    width, height = _text_size(probe, text, font)
    label = Image.new("RGBA", (width + 4, height + 6), (255, 255, 255, 0))
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
        title_font = _font(TITLE_SIZE)
        w, _ = _text_size(self.draw, title, title_font)
        self.draw.text(((width - w) / 2, 15), title, font=title_font, fill=AXIS)

    def y_of(self, value: float, y_max: float, y_min: float = 0.0) -> float:
        share = (max(y_min, min(value, y_max)) - y_min) / (y_max - y_min)
        return self.bottom - (self.bottom - self.top) * share

    def y_axis(self, y_max: float, label: str, right: bool = False, ticks: int = 5, grid: bool = True,
               y_min: float = 0.0):
        x = self.right if right else self.left
        self.draw.line([(x, self.top), (x, self.bottom)], fill=AXIS)
        for i in range(ticks + 1):
            value = y_min + (y_max - y_min) * i / ticks
            y = self.y_of(value, y_max, y_min)
            if grid and not right:
                self.draw.line([(self.left + 1, y), (self.right, y)], fill=GRID)
            text = f"{value:g}" if abs(value) < 1e4 else f"{value:.0f}"
            w, h = _text_size(self.draw, text, self.font)
            self.draw.text((x + 6 if right else x - w - 6, y - h / 2), text, font=self.font, fill=AXIS)
        _vertical_text(self.image, (x + 52 if right else x - 57, self.top + 40), label, self.font)

    def x_axis(self, y: float | None = None):
        y = self.bottom if y is None else y
        self.draw.line([(self.left, y), (self.right, y)], fill=AXIS)

    def x_ticks(self, ticks: Sequence[tuple[float, str]], label: str):
        """Tick marks and labels at (pixel x, text) under the plot, and the axis label below them."""
        for x, text in ticks:
            w, _ = _text_size(self.draw, text, self.font)
            self.draw.line([(x, self.bottom), (x, self.bottom + 4)], fill=AXIS)
            self.draw.text((x - w / 2, self.bottom + 6), text, font=self.font, fill=AXIS)
        w, _ = _text_size(self.draw, label, self.font)
        self.draw.text(((self.left + self.right - w) / 2, self.bottom + 24), label, font=self.font, fill=AXIS)

    def whisker(self, x: float, y_low: float, y_high: float, colour=AXIS, half_width: float = 3):
        self.draw.line([(x, y_low), (x, y_high)], fill=colour)
        for y in (y_low, y_high):
            self.draw.line([(x - half_width, y), (x + half_width, y)], fill=colour)

    def legend(self, entries: Sequence[tuple[str, tuple | None]], x: float | None = None, y: float | None = None,
               columns: int = 1, column_width: int = 150):
        """Coloured squares with names; an entry without a colour is a plain line of text."""
        x0 = self.left + 10 if x is None else x
        y0 = self.top + 5 if y is None else y
        for i, (name, colour) in enumerate(entries):
            cx = x0 + (i % columns) * column_width
            cy = y0 + (i // columns) * LEGEND_ROW
            if colour is not None:
                self.draw.rectangle([cx, cy + 3, cx + 9, cy + 12], fill=colour)
            self.draw.text((cx + (13 if colour is not None else 0), cy), name, font=self.font, fill=AXIS)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            self.image.save(tmp, format="PNG")
        return path


def _polyline(canvas: _Canvas, points: Sequence[tuple[float, float] | None], colour, width: int, dots: int = 0):
    """Connect consecutive points (None breaks the line); optional dots of radius `dots` at each point."""
    previous = None
    for point in points:
        if point is None:
            previous = None
            continue
        if previous:
            canvas.draw.line([previous, point], fill=colour, width=width)
        if dots:
            canvas.draw.ellipse([point[0] - dots, point[1] - dots, point[0] + dots, point[1] + dots], fill=colour)
        previous = point


def bar_chart(path: str | Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
              title: str, y_label: str, y_max: float | None = None,
              whiskers: Mapping[str, Sequence[tuple[float, float] | None]] | None = None,
              points: Mapping[str, Sequence[float]] | None = None, points_label: str = "",
              points_max: float | None = None) -> Path:
    """Grouped bars per category; `whiskers` (low, high) per bar of a series; `points` (one series) as dots
    on a right-hand axis. Writes a PNG."""
    width = max(900, 14 * len(series) * len(categories) + MARGIN_LEFT + MARGIN_RIGHT)
    canvas = _Canvas(width, 540, title)
    names = list(series)
    highs = [high for ws in (whiskers or {}).values() for w in ws if w is not None for high in _finite(w[1:])]
    y_max = y_max or nice_max(max(_finite([v for name in names for v in series[name]]) + highs, default=1.0))
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
            canvas.draw.rectangle([x0 + s * bar_width, canvas.y_of(value, y_max),
                                   x0 + (s + 1) * bar_width - 1, canvas.bottom], fill=BAR_COLOURS[s % 4])
            interval = (whiskers or {}).get(name, [None] * len(categories))[c]
            if interval is not None and len(_finite(interval)) == 2:
                canvas.whisker(x0 + (s + 0.5) * bar_width, canvas.y_of(interval[0], y_max),
                               canvas.y_of(interval[1], y_max), half_width=max(1.0, bar_width / 4))
        _vertical_text(canvas.image, (canvas.left + (c + 0.5) * slot, canvas.bottom + 6), category, canvas.font)
    legend = [(name, BAR_COLOURS[s % 4]) for s, name in enumerate(names)]
    if points:
        (label, pvalues), = points.items()
        p_max = points_max or nice_max(max(_finite(pvalues), default=1.0))
        canvas.y_axis(p_max, points_label or label, right=True)
        _polyline(canvas, [None if v is None or not math.isfinite(v) else
                           (canvas.left + (c + 0.5) * slot, canvas.y_of(v, p_max)) for c, v in enumerate(pvalues)],
                  MARKER, 1, dots=3)
        legend.append((label, MARKER))
    canvas.legend(legend, x=canvas.right - 160)
    return canvas.save(path)


def line_chart(path: str | Path, x_values: Sequence[float], series: Mapping[str, Sequence[float | None]], *,
               title: str, x_label: str, y_label: str, y_max: float | None = None,
               bold: tuple[str, Sequence[float | None]] | None = None,
               markers: Sequence[tuple[float, str]] = ()) -> Path:
    """One line per series over shared x values (None values leave gaps); `bold` (name, values) drawn thick
    over them; `markers` (x, label) as labelled vertical lines. Writes a PNG."""
    legend_rows = math.ceil((len(series) + (bold is not None)) / 5)
    canvas = _Canvas(980, 480 + LEGEND_ROW * legend_rows, title)
    canvas.bottom = canvas.image.height - 60 - LEGEND_ROW * legend_rows
    values = _finite([v for vs in series.values() for v in vs] + list(bold[1] if bold else []))
    y_max = y_max or nice_max(max(values, default=1.0))
    canvas.y_axis(y_max, y_label)
    canvas.x_axis()
    xs = list(x_values)
    x_min, x_max = (min(xs), max(xs)) if xs else (0, 1)
    span = (x_max - x_min) or 1

    def x_of(x):
        return canvas.left + (canvas.right - canvas.left) * (x - x_min) / span

    every = max(1, math.ceil(len(xs) / 30))
    canvas.x_ticks([(x_of(x), f"{x:g}") for i, x in enumerate(xs) if i % every == 0], x_label)
    for number, (x, label) in enumerate(markers):
        px = x_of(x)
        for y in range(int(canvas.top), int(canvas.bottom), 8):
            canvas.draw.line([(px, y), (px, min(y + 4, canvas.bottom))], fill=MARKER)
        w, _ = _text_size(canvas.draw, label, canvas.font)
        tx = px + 4 if px + 4 + w < canvas.right else px - 4 - w   # keep the label inside the plot
        canvas.draw.text((tx, canvas.top + 2 + LEGEND_ROW * number), label, font=canvas.font, fill=MARKER)

    def points(ys):
        return [None if y is None or not math.isfinite(y) else (x_of(x), canvas.y_of(y, y_max)) for x, y in zip(xs, ys)]

    colours = palette(len(series))
    for colour, ys in zip(colours, series.values()):
        _polyline(canvas, points(ys), colour, 1)
    legend = list(zip(series, colours))
    if bold is not None:
        _polyline(canvas, points(bold[1]), BOLD, 4, dots=3)
        legend.insert(0, (bold[0], BOLD))
    canvas.legend(legend, x=canvas.left, y=canvas.bottom + 44, columns=5, column_width=170)
    return canvas.save(path)


def _log_ticks(low: float, high: float) -> list[float]:
    """The 1, 2, 5 x 10^k values from the largest one <= low to the smallest one >= high."""
    values = [m * 10.0 ** k for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
              for m in (1, 2, 5)]
    start = max(v for v in values if v <= low * (1 + 1e-12))
    stop = min(v for v in values if v >= high * (1 - 1e-12))
    return [v for v in values if start <= v <= stop]


def scatter_chart(path: str | Path, points: Sequence[tuple[float, float, str]], *, title: str, x_label: str,
                  y_label: str, log_x: bool = False, errors: Sequence[tuple[float, float] | None] | None = None,
                  curve: Callable[[float], float] | None = None, legend: Sequence[str] = ()) -> Path:
    """Labelled points (x, y, label) with optional y error bars (low, high), a curve y = f(x) drawn across the x
    range, and lines of legend text. Writes a PNG."""
    canvas = _Canvas(980, 620 + LEGEND_ROW * len(legend), title)
    canvas.bottom = canvas.image.height - 64 - LEGEND_ROW * len(legend)
    drawn = [(x, y, label, (errors or [None] * len(points))[i]) for i, (x, y, label) in enumerate(points)
             if math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)]
    xs = [x for x, *_ in drawn] or [1.0]
    if log_x:
        ticks = _log_ticks(min(xs), max(xs) * (1.0001 if max(xs) == min(xs) else 1))
        x_low, x_high, scale = ticks[0], ticks[-1], math.log10
    else:
        x_low, x_high, steps = nice_range(min(xs), max(xs))
        scale, ticks = (lambda v: v), [x_low + (x_high - x_low) * i / steps for i in range(steps + 1)]

    def x_of(x):
        return canvas.left + (canvas.right - canvas.left) * (scale(x) - scale(x_low)) / (scale(x_high) - scale(x_low))

    ys = [y for _, y, *_ in drawn] + _finite([v for *_, e in drawn if e is not None for v in e])
    y_low, y_high, steps = nice_range(min(ys + [0.0]), max(ys + [0.0]))
    canvas.y_axis(y_high, y_label, ticks=steps, y_min=y_low)
    canvas.x_axis()
    if y_low < 0 < y_high:
        canvas.draw.line([(canvas.left, canvas.y_of(0, y_high, y_low)), (canvas.right, canvas.y_of(0, y_high, y_low))],
                         fill=AXIS)
    canvas.x_ticks([(x_of(t), f"{t:g}") for t in ticks], x_label)
    if curve is not None:   # drawn over the data's x range only: no extrapolation
        low, high = min(xs), max(xs)
        grid = [low * (high / low) ** (i / 200) if log_x else low + (high - low) * i / 200 for i in range(201)]
        _polyline(canvas, [(x_of(x), canvas.y_of(curve(x), y_high, y_low)) if y_low <= curve(x) <= y_high else None
                           for x in grid], MARKER, 2)
    for x, y, label, error in drawn:
        px, py = x_of(x), canvas.y_of(y, y_high, y_low)
        if error is not None and len(_finite(error)) == 2:
            canvas.whisker(px, canvas.y_of(error[0], y_high, y_low), canvas.y_of(error[1], y_high, y_low))
        canvas.draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=BAR_COLOURS[0], outline=AXIS)
        canvas.draw.text((px + 6, py - 7), label, font=canvas.font, fill=AXIS)
    canvas.legend([(line, None) for line in legend], x=canvas.left, y=canvas.bottom + 44)
    return canvas.save(path)
