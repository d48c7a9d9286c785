"""`nfed bench round`: seconds per in-process federated round, split into train / aggregate / evaluate / other,
at the demo's settings (25 synthetic districts, scale 0.008, tile 64, width 6, batch 8) unless told otherwise.

The data is made first (or taken from --data); the rounds then run in a fresh Python process, so its peak
resident memory (ru_maxrss of the process, and of its largest worker with --workers) is the federation's
alone, not the data generation's. What each part holds is said in nfed/benchmarks/round.py.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from nfed.commands.bench_step import json_worker
from nfed.commands.options import limited
from nfed.common.errors import ConfigError, NfedError


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
    from nfed.demo import DemoSettings
    from nfed.training.trainer import PROFILE_TILES, profile_config

    settings = DemoSettings()
    scale = settings.scale if scale is None else scale
    tile = PROFILE_TILES["demo"] if tile is None else tile
    if tile % 16:
        raise ConfigError(f"--tile {tile}: must be a multiple of 16 (W-Net pools 4 times)")
    config = profile_config("demo", width=width)
    if workers > 1 and jobs > 1:
        raise ConfigError("--workers (a process per client) and --jobs (a pool of processes): give one of them")
    task = {"rounds": rounds, "warmup": warmup, "workers": workers, "jobs": jobs, "local_epochs": local_epochs,
            "train_config": config.to_dict()}
    with tempfile.TemporaryDirectory(prefix="nfed-bench-round-") as scratch:
        if data is None:
            data = _synthetic_packs(Path(scratch), district_count, scale, tile, settings)
            source = {"districts": district_count, "scale": scale, "tile": tile}
        else:
            from nfed.runs.packs import find_packs

            find_packs(data)   # a missing or empty folder fails here, in one line
            source = {"data": str(data)}
        task.update(packs=str(data), run_dir=str(Path(scratch) / "run"))
        load_before = list(os.getloadavg())
        measured = _run_worker(task)
    result = {**source, "width": config.width, "batch": config.batch_size, "rounds": rounds, "warmup": warmup,
              "workers": workers, "jobs": jobs, "local_epochs": local_epochs, "cpu_count": os.cpu_count(),
              "load_average_before": load_before,
              "load_average_after": list(os.getloadavg()), **measured}
    if out is not None:
        from nfed.common.atomic import write_json_atomic

        write_json_atomic(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(summary_line(result))


def summary_line(result: dict) -> str:
    """One line: median (min) seconds per round and per part, and the peak memory."""
    parts = result["seconds"]
    split = ", ".join(f"{part} {parts[part]['median']:.2f} ({parts[part]['min']:.2f})"
                      for part in ("train", "aggregate", "evaluate", "other"))
    return (f"{result['districts_run']} districts, w {result['width']}, batch {result['batch']}, "
            f"{result['rounds']} rounds after {result['warmup']} warm-up: {parts['total']['median']:.2f} s per round "
            f"(min {parts['total']['min']:.2f}); median (min) s: {split}; peak RSS {result['peak_rss_mb']:.0f} MB"
            + (f" (+ largest worker {result['peak_rss_children_mb']:.0f} MB)" if result["workers"] > 1 else "")
            + f"; load average {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} "
              f"after")


def _synthetic_packs(folder: Path, count: int, scale: float, tile: int, settings) -> Path:
    from nfed.data.districts import district_names
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise

    names = district_names()
    if count > len(names):
        raise ConfigError(f"--districts {count}: there are {len(names)} districts")
    synthesise(folder / "synth", scale=scale, tile=tile, seed=settings.data_seed, districts=names[:count],
               min_per_district=settings.min_train_tiles, val_tiles=settings.val_tiles,
               test_tiles=settings.test_tiles)
    pack_folder(folder / "synth", folder / "packs", seed=settings.data_seed)
    return folder / "packs"


def _run_worker(task: dict) -> dict:
    """The rounds in a fresh interpreter; it prints one JSON line with the timings and its peak memory."""
    code = "import sys; from nfed.commands.bench_round import worker_main; worker_main(sys.argv[1])"
    return json_worker(code, [json.dumps(task)], "round benchmark")


def worker_main(task_json: str) -> None:
    """Entry point of the benchmark subprocess (prints one JSON object)."""
    import resource

    from nfed.runs.packs import find_packs
    from nfed.benchmarks.round import summarise, time_rounds
    from nfed.training.trainer import TrainConfig

    task = json.loads(task_json)
    try:
        packs = find_packs(task["packs"])
        timed = time_rounds(packs, Path(task["run_dir"]), TrainConfig.from_dict(task["train_config"]),
                            rounds=task["rounds"], warmup=task["warmup"], workers=task["workers"],
                            jobs=task.get("jobs", 0), local_epochs=task.get("local_epochs", 1))
    except NfedError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    print(json.dumps({"districts_run": len(packs), "seconds": summarise(timed["per_round"]), **timed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit,
                      "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / unit}))
