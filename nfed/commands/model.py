"""Model commands: `nfed model-info`, `nfed train-local`, `nfed evaluate`, `nfed predict`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from nfed.commands.options import (TRAINING_OPTIONS, apply_options, device_option, limited, precision_option,
                                   run_environment, track_option, tracked_run, training_setup)
from nfed.commands.predict_outputs import describe_regions, output_options
from nfed.common import strict_json
from nfed.common.errors import ConfigError
from nfed.common.paths import refuse_output_over_inputs
from nfed.training.study import METRIC_KEYS


@click.command("model-info")
@click.option("--width", type=limited("width"), default=8, show_default=True, help="base width w (study: 64)")
@click.option("--classes", type=click.Choice(["2", "5"]), default="2", show_default=True,
              help="2 = change / no change, 5 = no change + 4 change types")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def model_info(width, classes, as_json):
    """Print W-Net-CD's weighted layers, their count and the trainable parameter count."""
    import numpy as np

    from nfed.model.wnet import WNetCD, count_parameters, weighted_layers
    from nfed.training.trainer import require_memory_for

    if width < 1:
        raise ConfigError(f"--width {width}: must be >= 1")
    require_memory_for(width, int(classes), 1)
    model = WNetCD(width=width, classes=int(classes), rng=np.random.default_rng(0))
    layers = weighted_layers(model)
    info = {"model": "W-Net-CD", "width": width, "classes": int(classes), "weighted_layers": len(layers),
            "parameters": count_parameters(model), "layers": layers}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"W-Net-CD  width {width}, classes {classes}")
    click.echo(f"{'#':>3}  {'layer':<20} {'kind':<6} {'in':>5} {'out':>5} {'kernel':>6} {'parameters':>12}")
    for i, row in enumerate(layers, 1):
        click.echo(f"{i:>3}  {row['name']:<20} {row['kind']:<6} {row['in']:>5} {row['out']:>5} "
                   f"{row['kernel']:>6} {row['parameters']:>12,}")
    click.echo(f"weighted_layers: {info['weighted_layers']}")
    click.echo(f"parameters: {info['parameters']:,} (trainable; BatchNorm running statistics are state)")


@click.command("train-local")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="a district pack (.h5), or a folder of packs with --all")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="run folder")
@click.option("--all", "train_all", is_flag=True, help="train every district pack of the --data folder")
@apply_options(TRAINING_OPTIONS)
@device_option
@precision_option
@track_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def train_local(data_path, out_dir, train_all, device, precision, track, quiet, **options):
    """Train W-Net-CD on one district's own data (the study's "before FL" column).

    Writes OUT/<district>/best.h5 (checkpoint of the best epoch), OUT/<district>/metrics.json (test
    metrics and run facts) and OUT/<district>/epochs.jsonl (one line per epoch). With --all, every pack
    of the folder is trained in turn and OUT/local.csv lists district, samples (all tiles of the district's
    pack: train + val + test), precision, recall, f1 and iou on its test split, what they rest on (test
    tiles, pixels, change pixels) and how training ended (epochs, optimiser steps, stop: early-stop when
    the patience ran out, cap when --epochs was reached first, i.e. possibly not converged).
    """
    from nfed.common.progress import Countdown
    from nfed.runs.packs import find_packs
    from nfed.training.study import local_column

    config, env = training_setup(device, precision, **options)
    if train_all:
        if data_path.is_file():
            raise ConfigError(f"--all trains every pack of a folder, but --data {data_path} is a file; "
                              "drop --all to train this one pack")
        packs = list(find_packs(data_path).values())
    else:
        if data_path.is_dir():
            raise ConfigError(f"--data {data_path} is a folder: add --all to train every district in it")
        packs = [data_path]
    refuse_output_over_inputs(out_dir, {"--data": packs})

    countdown = Countdown(len(packs))

    def said(summary: dict) -> None:
        click.echo(f"{summary['district']}: f1 {summary['f1']:.4f} precision {summary['precision']:.4f} "
                   f"recall {summary['recall']:.4f} iou {summary['iou']:.4f} "
                   f"({summary['epochs_run']} epochs, {summary['steps']} steps, stopped by {summary['stop']}, "
                   f"{summary['wall_time_s']:.1f}s) -> {out_dir / summary['district']}")
        if train_all:
            click.echo(f"  {countdown.step()}")
        if tracker:
            tracker.log_district(summary)

    with tracked_run(track, out_dir, "train-local", env, train=config) as tracker:
        rows = local_column(packs, out_dir, config, env=env, quiet=quiet, table=train_all, on_row=said)
        if tracker:
            tracker.log_artifacts([out_dir / "local.csv"] if train_all else
                                  [out_dir / row["district"] / "metrics.json" for row in rows])
    if train_all:
        click.echo(f"wrote {out_dir / 'local.csv'} ({len(rows)} districts)")


@click.command("evaluate")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="checkpoint (.h5)")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="a district pack (.h5) or a folder of packs")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=limited("batch_size"), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@device_option
@precision_option
def evaluate(model_path, data_path, split, batch_size, as_json, device, precision):
    """Pooled change metrics of a checkpoint per district and over all districts together."""
    from nfed.training.study import score_checkpoint

    env = run_environment(device, precision)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    report = score_checkpoint(model_path, data_path, split, batch_size, env=env)
    districts = report["districts"]
    if as_json:
        click.echo(strict_json.dumps(report, indent=2))
        return
    click.echo(f"{'district':<24} {'samples':>7} " + " ".join(f"{k:>9}" for k in METRIC_KEYS))
    for row in districts + [{"district": "overall (pooled)", **report["overall"]}]:
        click.echo(f"{row['district']:<24} {row['samples']:>7} " + " ".join(f"{row[k]:>9.4f}" for k in METRIC_KEYS))


@click.command("predict")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="checkpoint (.h5)")
@click.option("--past", type=click.Path(path_type=Path), help="past image")
@click.option("--current", type=click.Path(path_type=Path), help="current image (same size as --past)")
@click.option("--pairs", type=click.Path(path_type=Path), help="folder with A/ (past) and B/ (current)")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="mask PNG, or GeoTIFF if it ends in .tif (with --past/--current); output folder (with --pairs)")
@click.option("--batch-size", type=limited("batch_size"), default=8, show_default=True, help="tiles per forward pass")
@output_options
@device_option
@precision_option
@click.option("--quiet", is_flag=True, help="no progress bar")
def predict(model_path, past, current, pairs, out_path, batch_size, outputs, device, precision, quiet):
    """Write 0/255 change masks for image pairs of any size (tiled at the model's tile size): PNG, or GeoTIFF
    for GeoTIFF input (nfed[geo]); optionally change polygons (GeoJSON, label JSON) and an overlay PNG."""
    from nfed.training.predict import find_pairs, mask_name, predict_pairs, write_change_summary

    if (pairs is None) == (past is None and current is None) or (pairs is None and (past is None or current is None)):
        raise ConfigError("give either --past and --current, or --pairs DIR")
    if pairs is None:
        jobs = [(past, current, out_path)]
        refuse_output_over_inputs(out_path, {"--model": model_path, "--past": past, "--current": current})
    else:
        jobs = [(a, b, out_path / mask_name(a)) for a, b in find_pairs(pairs)]
        refuse_output_over_inputs(out_path, {"--model": model_path, "--pairs": [p for job in jobs for p in job[:2]]})
    start = time.perf_counter()
    env = run_environment(device, precision)
    with env.active():
        summaries = predict_pairs(model_path, jobs, device=env.device, batch_size=batch_size, outputs=outputs,
                                  show_progress=not quiet)
    summary_csv = write_change_summary(summaries, out_path, single=pairs is None)
    if pairs is None:
        summary = summaries[0]
        click.echo(f"wrote {', '.join(summary['files'])} ({summary['width']}x{summary['height']}, "
                   f"{summary['changed_fraction']:.2%} changed{describe_regions(summary)})")
    else:
        click.echo(f"wrote {len(jobs)} masks to {out_path} in {time.perf_counter() - start:.1f}s")
    if summary_csv is not None:
        click.echo(f"wrote {summary_csv}")
