"""`nfed predict`'s GIS outputs as one decorator: --polygons, --overlay, --min-area, --simplify, --district
arrive as a single OutputOptions argument, and the per-image summary CSV is written here."""
from __future__ import annotations

import functools

import click

from nfed.common.errors import ConfigError
from nfed.data.polygons import DEFAULT_MIN_AREA, DEFAULT_SIMPLIFY

_OPTIONS = (
    click.option("--polygons", is_flag=True,
                 help="also write change polygons: <mask>.geojson (map coordinates for GeoTIFFs) and <mask>.json "
                      "(nfed label format); needs nfed[geo]"),
    click.option("--overlay", is_flag=True, help="also write <mask>_overlay.png: current image, changes outlined"),
    click.option("--min-area", type=int, default=DEFAULT_MIN_AREA, show_default=True,
                 help="drop change regions (and fill holes) smaller than this many pixels"),
    click.option("--simplify", type=float, default=DEFAULT_SIMPLIFY, show_default=True,
                 help="outline simplification tolerance in pixels (0 keeps every pixel step)"),
    click.option("--district", default="unassigned", show_default=True, help="district named in the label JSON"),
)


def output_options(command):
    """Add the GIS output options to a click command; it receives them as `outputs` (OutputOptions)."""
    @functools.wraps(command)
    def wrapper(*args, polygons, overlay, min_area, simplify, district, **kwargs):
        from nfed.data.polygons import require_shapely
        from nfed.training.predict import OutputOptions

        if min_area < 0:
            raise ConfigError(f"--min-area {min_area}: must be >= 0")
        if simplify < 0:
            raise ConfigError(f"--simplify {simplify}: must be >= 0")
        if not district.strip():
            raise ConfigError("--district must not be empty")
        if polygons or overlay:
            require_shapely()
        outputs = OutputOptions(polygons=polygons, overlay=overlay, min_area=min_area, simplify=simplify,
                                district=district)
        return command(*args, outputs=outputs, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def describe_regions(summary: dict) -> str:
    """' 3 change regions: new 2 (140 px), demolished 1 (33 px)' or '' without polygons."""
    if "regions" not in summary:
        return ""
    kinds = ", ".join(f"{row['type']} {row['count']} ({row['pixels']} px)" for row in summary["rows"])
    return f"; {summary['regions']} change regions" + (f": {kinds}" if kinds else "")
