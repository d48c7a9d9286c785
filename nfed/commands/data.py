"""`nfed synth`, `nfed pack`, `nfed info`: make, ingest and inspect district data."""
from __future__ import annotations

import time
from pathlib import Path

import click

from nfed.commands.options import limited
from nfed.common import strict_json
from nfed.common.names import printable
from nfed.common.paths import refuse_output_over_inputs
from nfed.common.progress import progress


def _bar(enabled: bool):
    """Adapter from nfed.common.progress to the (iterable, length, label) callback of synth/pack."""
    return lambda iterable, length, label: progress(iterable, label=label, length=length, enabled=enabled)


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write <district>/<tile id>.json, _past.png, _current.png into.")
@click.option("--scale", default=0.025, show_default=True, type=limited("scale"),
              help="Tiles per district = max(min, round(scale x the study's sample count)); with fixed "
                   "evaluation tiles (below) the training split, the evaluation tiles come on top.")
@click.option("--tile", default=64, show_default=True, type=limited("tile"), help="Tile size in pixels.")
@click.option("--seed", default=0, show_default=True, type=limited("seed"), help="Same seed -> identical files.")
@click.option("--districts", default="all", show_default=True,
              help="'all' or comma-separated district names (e.g. Gangnam-gu,Jung-gu).")
@click.option("--min-per-district", default=8, show_default=True, type=limited("min_per_district"),
              help="Least number of tiles per district (of training tiles with fixed evaluation tiles).")
@click.option("--val-tiles", default=16, show_default=True, type=limited("eval_tiles"),
              help="Validation tiles per district, fixed whatever --scale (0 with --test-tiles 0: let "
                   "`nfed pack --split` divide the tiles).")
@click.option("--test-tiles", default=24, show_default=True, type=limited("eval_tiles"),
              help="Test tiles per district, fixed whatever --scale (--scale then sizes the training split).")
@click.option("--jobs", default=0, show_default=True, type=limited("jobs"),
              help="Worker processes (0: one per CPU, at most 4); the output does not depend on it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out_dir, scale, tile, seed, districts, min_per_district, val_tiles, test_tiles, jobs, quiet):
    """Generate synthetic bi-temporal tiles with JSON change labels for Seoul's districts."""
    from nfed.data.synth import synthesise

    start = time.perf_counter()
    summary = synthesise(out_dir, scale=scale, tile=tile, seed=seed, districts=districts,
                         min_per_district=min_per_district, val_tiles=val_tiles, test_tiles=test_tiles,
                         jobs=jobs, progress=_bar(not quiet))
    seconds = time.perf_counter() - start
    tiles = sum(n for n, _ in summary.values())
    share = sum(n * s for n, s in summary.values()) / max(tiles, 1)
    click.echo(f"wrote {tiles} tiles ({tile}x{tile}) for {len(summary)} district(s) to {out_dir} "
               f"in {seconds:.1f} s ({tiles / max(seconds, 1e-9):.0f} tiles/s); change pixels {share:.1%}")


@click.command()
@click.argument("src", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the packs, one <district>.h5 each.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "json", "levir", "geotiff"]),
              help="Source layout (geotiff: A/*.tif, B/*.tif, label/*.geojson; needs nfed[geo]).")
@click.option("--tile", default=None, type=limited("tile"),
              help="Tile size to cut images into (LEVIR default 256; JSON default: the labels' size).")
@click.option("--split", default="0.7,0.15,0.15", show_default=True, help="Train,val,test fractions.")
@click.option("--seed", default=0, show_default=True, type=limited("seed"), help="Seed of the split.")
@click.option("--district-map", type=click.Path(dir_okay=False), default=None,
              help="LEVIR: CSV 'stem,district' assigning images to districts.")
@click.option("--skip-bad", is_flag=True, help="Skip bad pairs (and list them) instead of stopping.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pack(src, out_dir, fmt, tile, split, seed, district_map, skip_bad, quiet):
    """Pack JSON-labelled pairs, a LEVIR-CD folder or GeoTIFF pairs with GeoJSON labels into one HDF5 file per
    district."""
    from nfed.data.pack import pack_folder, parse_split

    refuse_output_over_inputs(out_dir, {"SRC": src, "--district-map": district_map})
    report = pack_folder(src, out_dir, fmt=fmt, tile=tile, split=parse_split(split), seed=seed,
                         district_map=district_map, skip_bad=skip_bad, progress=_bar(not quiet))
    for district, path in report.written.items():
        counts = report.counts[district]
        click.echo(f"{path}: train {counts['train']}, val {counts['val']}, test {counts['test']}")
    if report.skipped:
        click.echo(f"skipped {len(report.skipped)} item(s):", err=True)
        for message in report.skipped:
            click.echo(f"  skipped: {printable(message)}", err=True)
    if report.padded:
        click.echo(f"warning: {report.padded} image(s) smaller than the tile were zero-padded (mask 0 outside the "
                   "image); a smaller --tile wastes less", err=True)
    click.echo(f"packed {len(report.written)} district(s) from {src} ({report.source_format}) into {out_dir}")


@click.command()
@click.argument("pack_path", metavar="PACK.h5", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(pack_path, as_json):
    """Show what a district pack holds: tiles per split, change share, change types, tile size, source."""
    from nfed.data.reader import DistrictPack

    with DistrictPack(pack_path) as district_pack:
        summary = district_pack.summary()
    if as_json:   # the pack's strings escaped so the terminal shows them; still JSON with the same values
        click.echo(printable(strict_json.dumps(summary, indent=2, ensure_ascii=False), newlines=True, json_text=True))
        return
    splits = summary["splits"]
    lines = [f"{Path(summary['path']).name}: district {summary['district']}, tile {summary['tile_size']}, "
             f"source {summary['source']}, split seed {summary['split_seed']}",
             "  tiles: " + ", ".join(f"{name} {s['tiles']}" for name, s in splits.items())
             + f" (total {summary['tiles']})",
             f"  change pixels: {summary['change_pixel_share']:.2%} ("
             + ", ".join(f"{name} {s['change_pixel_share']:.2%}" for name, s in splits.items()) + ")"]
    if summary["change_types"]:
        lines.append("  change types: " + ", ".join(
            f"{name} {v['pixels']} px in {v['tiles']} tiles" for name, v in summary["change_types"].items()))
    for line in lines:   # every string a pack holds is data: no escape sequence reaches the terminal
        click.echo(printable(line))
