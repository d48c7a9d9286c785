"""One synthetic bi-temporal tile (`nfed synth`): a scene drawn in a district's style, with its labelled changes.

Every tile shows ground texture, roads with cars, vegetation and rooftops (rectangles and L-shapes,
rotated, with flat, gabled, ribbed or equipped roofs) with shadows. Between the two dates the whole
image shifts radiometrically (season, light), is misregistered by up to 2 px, and changes in ways that
are NOT labelled (cars move, vegetation changes colour, shadows move with the sun), while labelled
buildings are new, demolished, renewed (same footprint, different roof structure) or recoloured (same
footprint and structure, new colour). Simple differencing therefore fails; the change concept must be
learned. The same style and random stream give the same tile.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nfed.data.labels import CHANGE_CODES, CHANGE_TYPES, rasterise_polygons
from nfed.data.synthstyle import ROOF_FAMILIES, DistrictStyle

MARGIN = 2          # canvas border (px) that allows the up-to-2-px misregistration
ROOF_STRUCTURES = ("flat", "gable", "ribbed", "equipped")


# --------------------------------------------------------------------------------------------- geometry

@dataclass
class Building:
    """A footprint: parts (x0, x1, y0, y1) in local coordinates, rotated by `angle` around (cx, cy)."""

    cx: float
    cy: float
    angle: float
    outline: list                # [(x, y), ...] local outline
    parts: list                  # local rectangles forming the footprint
    radius: float
    colour: tuple                # RGB floats
    structure: str
    height: float                # shadow length factor (px)
    detail: int                  # seed of roof details (equipment positions)

    def to_canvas(self, points) -> list[tuple[float, float]]:
        c, s, cx, cy = math.cos(self.angle), math.sin(self.angle), self.cx, self.cy
        return [(x * c - y * s + cx, x * s + y * c + cy) for x, y in points]

    def polygon(self, shift=(0.0, 0.0)) -> list[tuple[float, float]]:
        return [(x + shift[0], y + shift[1]) for x, y in self.to_canvas(self.outline)]


def _rect(x0, x1, y0, y1) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _footprint(r: random.Random, style: DistrictStyle, scale: float):
    """Local outline and parts of a rectangle or an L-shape."""
    u = [r.random() for _ in range(6)]
    low, high = style.size_range
    w = (low + (high - low) * u[0]) * scale
    h = w * (0.55 + 0.45 * u[1])
    if u[2] < 0.5:
        w, h = h, w
    if u[3] < style.l_shape_probability:
        nw, nh = w * (0.35 + 0.25 * u[4]), h * (0.35 + 0.25 * u[5])
        x0, x1, y0, y1 = -w / 2, w / 2, -h / 2, h / 2
        outline = [(x0, y0), (x1 - nw, y0), (x1 - nw, y0 + nh), (x1, y0 + nh), (x1, y1), (x0, y1)]
        parts = [(x0, x1 - nw, y0, y1), (x1 - nw, x1, y0 + nh, y1)]
    else:
        outline = _rect(-w / 2, w / 2, -h / 2, h / 2)
        parts = [(-w / 2, w / 2, -h / 2, h / 2)]
    return outline, parts, 0.5 * math.hypot(w, h)


def clip_polygon(points: list[tuple[float, float]], size: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clip of a polygon to the box [0, size] x [0, size]."""
    def clip(poly, inside, cross):
        out = []
        for i, current in enumerate(poly):
            previous = poly[i - 1]
            if inside(current):
                if not inside(previous):
                    out.append(cross(previous, current))
                out.append(current)
            elif inside(previous):
                out.append(cross(previous, current))
        return out

    def at_x(x):
        return lambda p, q: (x, p[1] + (q[1] - p[1]) * (x - p[0]) / (q[0] - p[0]))

    def at_y(y):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (y - p[1]) / (q[1] - p[1]), y)

    poly = points
    for inside, cross in ((lambda p: p[0] >= 0, at_x(0.0)), (lambda p: p[0] <= size, at_x(size)),
                          (lambda p: p[1] >= 0, at_y(0.0)), (lambda p: p[1] <= size, at_y(size))):
        if not poly:
            break
        poly = clip(poly, inside, cross)
    return poly


def _polygon_area(points) -> float:
    """Shoelace formula."""
    if len(points) < 3:
        return 0.0
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


# ---------------------------------------------------------------------------------------------- drawing

def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(v * factor))) for v in colour)


def _draw_roof(draw: ImageDraw.ImageDraw, building: Building, scale: float) -> None:
    """Roof of a building in its structure: flat with parapet, gabled halves, ribs, or rooftop units."""
    colour = building.colour
    draw.polygon(building.polygon(), fill=_shade(colour, 1.0),
                 outline=_shade(colour, 1.18) if building.structure == "flat" else None)
    details = random.Random(building.detail)
    for x0, x1, y0, y1 in building.parts:
        if building.structure == "gable":
            if x1 - x0 >= y1 - y0:
                ym = 0.5 * (y0 + y1)
                draw.polygon(building.to_canvas(_rect(x0, x1, y0, ym)), fill=_shade(colour, 1.15))
                draw.polygon(building.to_canvas(_rect(x0, x1, ym, y1)), fill=_shade(colour, 0.78))
            else:
                xm = 0.5 * (x0 + x1)
                draw.polygon(building.to_canvas(_rect(x0, xm, y0, y1)), fill=_shade(colour, 1.15))
                draw.polygon(building.to_canvas(_rect(xm, x1, y0, y1)), fill=_shade(colour, 0.78))
        elif building.structure == "ribbed":
            step = 2.2 * scale
            x = x0 + step / 2
            while x < x1 - 0.5:
                draw.polygon(building.to_canvas(_rect(x, min(x + 0.9 * scale, x1), y0, y1)),
                             fill=_shade(colour, 0.7))
                x += step
        elif building.structure == "equipped":
            for _ in range(details.randint(1, 3)):
                side = details.uniform(1.5, 3.0) * scale
                ux = details.uniform(x0, max(x0, x1 - side))
                uy = details.uniform(y0, max(y0, y1 - side))
                draw.polygon(building.to_canvas(_rect(ux, ux + side, uy, uy + side)),
                             fill=_shade(colour, details.choice((0.55, 1.35))))


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Three independent low-frequency noise fields in [-1, 1], shape [size, size, 3] (bilinear
    upsampling of a coarse random grid)."""
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.BILINEAR), np.float32)
    return smooth * np.float32(1 / 127.5) - np.float32(1)


# ------------------------------------------------------------------------------------------------ tiles

@dataclass
class SynthTile:
    """One generated pair: images [T,T,3] uint8 and changes [(type, polygon in tile pixels)]."""

    past: np.ndarray
    current: np.ndarray
    changes: list

    def mask(self) -> np.ndarray:
        t = self.past.shape[0]
        return rasterise_polygons(t, t, [(CHANGE_CODES[kind], poly) for kind, poly in self.changes])


def _place(r: random.Random, style, scale, size, occupied, roads, count) -> list[Building]:
    """Up to `count` non-overlapping footprints off the roads (rejection sampling on bounding circles)."""
    buildings = []
    grid = math.radians(style.grid_angle)
    for _ in range(count * 3):
        if len(buildings) >= count:
            break
        outline, parts, radius = _footprint(r, style, scale)
        u, v = r.random(), r.random()
        cx, cy = -radius * 0.3 + u * (size + radius * 0.6), -radius * 0.3 + v * (size + radius * 0.6)
        if any(math.hypot(cx - ox, cy - oy) < radius + orad + scale for ox, oy, orad in occupied):
            continue
        if any(abs((cy if horizontal else cx) - centre) < half + radius * 0.8 for horizontal, centre, half in roads):
            continue
        occupied.append((cx, cy, radius))
        angle = grid + math.radians(r.gauss(0, style.rotation_spread)) + r.randrange(2) * math.pi / 2
        colour = style.palette[r.randrange(len(style.palette))] * r.uniform(0.85, 1.15)
        buildings.append(Building(cx=cx, cy=cy, angle=angle, outline=outline, parts=parts, radius=radius,
                                  colour=tuple(colour.tolist()),
                                  structure=ROOF_STRUCTURES[r.randrange(len(ROOF_STRUCTURES))],
                                  height=r.uniform(1.0, 3.5) * scale, detail=r.getrandbits(31)))
    return buildings


def _other_colour(r: random.Random, style, colour) -> tuple:
    """A roof colour clearly different from `colour` (palette colour or a fresh paint)."""
    colour = np.array(colour, np.float32)
    for _ in range(8):
        candidate = style.palette[r.randrange(len(style.palette))] * r.uniform(0.85, 1.15)
        if r.random() < 0.4:
            candidate = ROOF_FAMILIES[r.randrange(len(ROOF_FAMILIES))] * r.uniform(0.85, 1.15)
        if np.abs(candidate - colour).sum() > 90:
            return tuple(candidate.tolist())
    return tuple(np.clip(255 - colour, 20, 235).tolist())


def generate_tile(style: DistrictStyle, rng: np.random.Generator, tile: int = 64) -> SynthTile:
    """One bi-temporal tile of a district in its style (drawn with Pillow, textured with NumPy)."""
    scale = tile / 64.0
    size = tile + 2 * MARGIN
    area = scale ** 2
    r = random.Random(int(rng.integers(2**62)))  # scalar draws: much cheaper than NumPy's one by one

    # static scene: ground, roads, vegetation layout, texture
    ground = style.ground * rng.uniform(0.9, 1.1, 3)
    base = Image.new("RGB", (size, size), _shade(ground, 1.0))
    base_draw = ImageDraw.Draw(base)
    roads = []
    asphalt = r.uniform(60, 95)
    for _ in range(2):
        if r.random() < style.road_probability:
            horizontal = r.random() < 0.5
            centre = r.uniform(0.15, 0.85) * size
            half = r.uniform(2.5, 5.0) * scale
            roads.append((horizontal, centre, half))
            box = (0, centre - half, size, centre + half) if horizontal else (centre - half, 0, centre + half, size)
            base_draw.rectangle(box, fill=_shade((asphalt, asphalt, asphalt * 1.05), 1.0))
    occupied: list[tuple[float, float, float]] = []
    blobs = []
    for _ in range(_poisson(r, style.vegetation_share * area)):
        cx, cy = r.uniform(0, size), r.uniform(0, size)
        radius = r.uniform(2.5, 7.0) * scale
        for _ in range(r.randint(1, 3)):
            ox, oy = r.gauss(0, radius * 0.5), r.gauss(0, radius * 0.5)
            rr = radius * r.uniform(0.5, 1.0)
            blobs.append((cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr, r.uniform(0.85, 1.15)))
        occupied.append((cx, cy, radius * 0.6))
    texture, illumination = _texture(rng, size, tile)

    # buildings: static ones plus the changed ones
    n_static = max(1, _poisson(r, style.density * area))
    n_changed = min(1 + _poisson(r, max(style.change_rate - 1, 0.0)) if r.random() > 0.05 else 0, 6)
    placed = _place(r, style, scale, size, occupied, roads, n_static + n_changed)
    n_changed = min(n_changed, len(placed))
    kinds = r.choices(range(len(CHANGE_TYPES)), weights=style.type_weights.tolist(), k=n_changed)
    changed = list(zip(placed[:n_changed], (CHANGE_TYPES[k] for k in kinds)))
    static = placed[n_changed:]
    past_buildings, current_buildings, changes = list(static), list(static), []
    for building, kind in changed:
        if kind == "new":
            current_buildings.append(building)
        elif kind == "demolished":
            past_buildings.append(building)
        elif kind == "renewed":
            past_buildings.append(building)
            choices = [s for s in ROOF_STRUCTURES if s != building.structure]
            renewed = Building(**{**building.__dict__, "structure": choices[r.randrange(len(choices))],
                                  "colour": tuple(c * r.uniform(0.8, 1.2) for c in building.colour),
                                  "detail": r.getrandbits(31)})
            current_buildings.append(renewed)
        else:  # recoloured
            past_buildings.append(building)
            current_buildings.append(Building(**{**building.__dict__,
                                                 "colour": _other_colour(r, style, building.colour)}))
        polygon = clip_polygon(building.polygon((-MARGIN, -MARGIN)), float(tile))
        if _polygon_area(polygon) >= 2.0 * scale:
            changes.append((kind, polygon))
    demolished = [b for b, kind in changed if kind == "demolished"]
    soil = _shade(ground * rng.uniform(0.75, 1.2) + rng.normal(0, 12, 3), 1.0)

    # per date: vegetation season, shadows (the sun moves), roofs, cars, radiometry, misregistration, noise
    sun = r.uniform(0, 2 * math.pi)
    images = []
    for date in (0, 1):
        canvas = base.copy()
        draw = ImageDraw.Draw(canvas)
        season = style.season * r.uniform(0.6, 1.4) if date else 0.0
        leaf = style.vegetation * (1 - season) + AUTUMN_LEAVES * season
        for x0, y0, x1, y1, tone in blobs:
            draw.ellipse((x0, y0, x1, y1), fill=_shade(leaf, tone))
        buildings = past_buildings if date == 0 else current_buildings
        angle = sun + (r.gauss(0, 0.6) if date else 0.0)
        length = r.uniform(0.6, 1.4)
        shadow = Image.new("L", (size, size), 0)
        shadow_draw = ImageDraw.Draw(shadow)
        for b in buildings:  # mask value 128: the shadow halves the brightness below it
            shadow_draw.polygon(b.polygon((math.cos(angle) * b.height * length,
                                           math.sin(angle) * b.height * length)), fill=128)
        canvas = Image.composite(Image.new("RGB", (size, size)), canvas, shadow)
        draw = ImageDraw.Draw(canvas)
        if date == 1:
            for b in demolished:  # cleared lot
                draw.polygon(b.polygon(), fill=soil)
        for b in buildings:
            _draw_roof(draw, b, scale)
        for horizontal, centre, half in roads:
            for _ in range(_poisson(r, 3.0 * scale)):
                along = r.uniform(0, size)
                across = centre + r.uniform(-half * 0.6, half * 0.6)
                length_car, width_car = 3.5 * scale, 1.8 * scale
                box = (along, across - width_car / 2, along + length_car, across + width_car / 2) if horizontal \
                    else (across - width_car / 2, along, across + width_car / 2, along + length_car)
                draw.rectangle(box, fill=(r.randrange(20, 240), r.randrange(20, 240), r.randrange(20, 240)))
        dy = dx = 0
        if date == 1:  # misregistration, then a radiometric shift as a per-channel lookup table
            dy, dx = r.randint(-MARGIN, MARGIN), r.randint(-MARGIN, MARGIN)
        pixels = np.asarray(canvas)[MARGIN + dy:MARGIN + dy + tile, MARGIN + dx:MARGIN + dx + tile]
        if date == 1:
            gain = style.gain * rng.uniform(0.9, 1.1, 3)
            gamma = style.gamma * r.uniform(0.92, 1.08)
            offset = style.offset + r.gauss(0, 6)
            levels = (np.arange(256) / 255.0) ** gamma
            lut = np.clip(255 * levels[None, :] * gain[:, None] + offset + 0.5, 0, 255).astype(np.int16)
            pixels = lut.ravel().take(pixels + _CHANNEL_OFFSETS)  # lut[channel, value] in one gather
            pixels = pixels * illumination[MARGIN + dy:MARGIN + dy + tile, MARGIN + dx:MARGIN + dx + tile]
        grain = texture[MARGIN + dy:MARGIN + dy + tile, MARGIN + dx:MARGIN + dx + tile]
        noise = _sensor_noise(r, tile)
        images.append(np.clip(pixels + grain + noise, 0, 255).astype(np.uint8))
    return SynthTile(past=images[0], current=images[1], changes=changes)


AUTUMN_LEAVES = np.array([150, 128, 62], np.float32)
_CHANNEL_OFFSETS = np.array([0, 256, 512], np.intp)


def _poisson(r: random.Random, mean: float) -> int:
    """Poisson draw by multiplying uniforms (Knuth); fine for the small means used here."""
    limit, count, product = math.exp(-mean), 0, r.random()
    while product > limit:
        count += 1
        product *= r.random()
    return count


def _texture(rng, size: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Static surface texture [size, size, 1] int16 shared by both dates, and an illumination field
    [size, size, 1] float32 around 1 (cloud shadow, haze) that only the current date gets."""
    noise = _smooth_noise(rng, size, max(3, tile // 6))
    texture = (noise[..., 0:1] * 12 + noise[..., 1:2] * 6).astype(np.int16)
    illumination = 1 + np.float32(0.2) * noise[..., 2:3]
    return texture, illumination


@functools.lru_cache(maxsize=8)
def _noise_bank(tile: int) -> np.ndarray:
    """A fixed bank of Gaussian sensor noise (sigma 3 DN); tiles take random windows of it (fast)."""
    bank = np.random.default_rng(20230401).normal(0, 3.0, (2 * tile, 2 * tile, 3))
    return np.round(bank).astype(np.int16)


def _sensor_noise(r: random.Random, tile: int) -> np.ndarray:
    oy, ox = r.randrange(tile), r.randrange(tile)
    return _noise_bank(tile)[oy:oy + tile, ox:ox + tile]
