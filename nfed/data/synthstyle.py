"""How each synthetic district looks and changes (`nfed synth`): a style drawn from its name and the seed.

Districts draw their own palette, density, sizes, vegetation, change rate and radiometric shift, so they are
non-IID while sharing the change concept (nfed.data.synthscene draws the tiles in a style).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# Roof colour families (RGB) that districts draw their palettes from.
ROOF_FAMILIES = np.array([
    [176, 84, 62], [150, 150, 152], [78, 108, 152], [92, 134, 102], [196, 182, 160],
    [120, 72, 60], [210, 210, 205], [66, 70, 78], [170, 120, 70], [110, 140, 160],
], dtype=np.float32)


@dataclass(frozen=True)
class DistrictStyle:
    """How one district looks and changes (all drawn deterministically from name and seed)."""

    palette: np.ndarray          # [P,3] roof colours
    ground: np.ndarray           # [3] ground colour
    vegetation: np.ndarray       # [3] summer vegetation colour
    density: float               # buildings per 64x64 area
    size_range: tuple[float, float]  # building side, in px at 64x64
    vegetation_share: float      # expected number of vegetation blobs per 64x64 area
    road_probability: float
    l_shape_probability: float
    rotation_spread: float       # degrees of footprint rotation around the grid direction
    change_rate: float           # mean changed buildings per tile: 1 + Poisson(rate - 1), at most 6
    type_weights: np.ndarray     # [4] relative frequency of new, demolished, renewed, recoloured
    gain: np.ndarray             # [3] mean per-channel gain of the current date
    offset: float                # mean brightness offset of the current date
    gamma: float                 # mean gamma of the current date
    season: float                # 0 = same season, 1 = summer -> autumn vegetation
    grid_angle: float            # street-grid orientation, degrees


def district_style(name: str, seed: int = 0) -> DistrictStyle:
    """The style of a district: same name and seed -> same style."""
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8")), 7])
    families = rng.choice(len(ROOF_FAMILIES), size=rng.integers(3, 6), replace=False)
    palette = np.clip(ROOF_FAMILIES[families] + rng.normal(0, 14, (len(families), 3)), 20, 240)
    ground = np.clip(np.array([128, 124, 112]) + rng.normal(0, 14, 3), 70, 190)
    vegetation = np.clip(np.array([70, 110, 58]) + rng.normal(0, 10, 3), 30, 160)
    small = rng.uniform(10, 14)
    return DistrictStyle(
        palette=palette.astype(np.float32), ground=ground.astype(np.float32),
        vegetation=vegetation.astype(np.float32),
        density=rng.uniform(3, 7), size_range=(small, small + rng.uniform(6, 12)),
        vegetation_share=rng.uniform(0.5, 4.0), road_probability=rng.uniform(0.4, 0.9),
        l_shape_probability=rng.uniform(0.15, 0.5), rotation_spread=rng.uniform(0, 30),
        change_rate=rng.uniform(2.0, 4.0), type_weights=rng.dirichlet(np.full(4, 4.0)),
        gain=rng.uniform(0.85, 1.15, 3).astype(np.float32), offset=float(rng.uniform(-18, 18)),
        gamma=float(rng.uniform(0.85, 1.15)), season=float(rng.uniform(0.1, 0.9)),
        grid_angle=float(rng.uniform(0, 90)),
    )
