"""`nfed bench round`: parses the options and prints; the benchmark is nfed/benchmarks/round.py.

Seconds per in-process federated round, split into train / aggregate / evaluate / other, at the demo's settings
(25 synthetic districts, scale 0.008, tile 64, width 6, batch 8) unless told otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from nfed.commands.options import limited


@click.command("round")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder of district packs (*.h5) to federate; default: synthetic districts made in a temporary "
                   "folder (removed afterwards) at --districts/--scale/--tile")
@click.option("--districts", "district_count", type=limited("min_clients"), default=25, show_default=True,
              help="number of synthetic districts (the first N of the district table; ignored with --data)")
@click.option("--scale", type=limited("scale"), default=None,
              help="share of the study's samples per synthetic district (default: the demo's, 0.008)")
@click.option("--tile", type=limited("tile"), default=None,
              help="synthetic tile size, a multiple of 16 (default: the demo profile's, 64)")
@click.option("--width", type=limited("width"), default=None, help="W-Net base width (default: the demo profile's)")
@click.option("--rounds", type=limited("rounds"), default=3, show_default=True, help="timed rounds")
@click.option("--warmup", type=limited("warmup"), default=1, show_default=True, help="untimed rounds first")
@click.option("--workers", type=limited("workers"), default=0, show_default=True,
              help="train the clients in N worker processes (as nfed federate --workers; 0/1: in turn, in-process)")
@click.option("--jobs", type=limited("jobs"), default=0, show_default=True,
              help="clients trained and evaluated on a pool of N worker processes, as nfed demo does (0/1: none)")
@click.option("--local-epochs", type=limited("local_epochs"), default=1, show_default=True,
              help="epochs per client per round (nfed demo: 3)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the JSON to this file (atomically)")
def round_(data, district_count, scale, tile, width, rounds, warmup, workers, jobs, local_epochs, as_json,
           out):
    """Seconds per federated round (FedAvg, one local epoch, the demo profile) split into train / aggregate /
    evaluate / other: median and min over --rounds after --warmup, and the peak memory of the run."""
    from nfed.benchmarks.round import run_round_bench, summary_line
    from nfed.demo import DemoSettings
    from nfed.training.trainer import PROFILE_TILES, profile_config

    result = run_round_bench(profile_config("demo", width=width), settings=DemoSettings(), data=data,
                             district_count=district_count, scale=scale,
                             tile=PROFILE_TILES["demo"] if tile is None else tile, rounds=rounds, warmup=warmup,
                             workers=workers, jobs=jobs, local_epochs=local_epochs)
    if out is not None:
        from nfed.common.atomic import write_json_atomic

        write_json_atomic(out, result)
    click.echo(json.dumps(result, indent=2) if as_json else summary_line(result))
