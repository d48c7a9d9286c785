"""`nfed demo`: the whole synthetic study on CPU: synth -> pack -> train-local --all -> federate -> report.

Everything runs in this process through the Python APIs. Output layout (the same on every run; a rerun
overwrites it): DIR/synth, DIR/packs, DIR/local, DIR/federated, DIR/report, and DIR/demo.json with the
stage times and the headline numbers.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from .. import backend
from ..atomic import write_json_atomic, write_text_atomic
from ..errors import ConfigError
from ..runlock import LOCK_NAME, RunLock
from .options import device_option, limited, precision_option

# Federation set-up of the demo (the model/optimiser set-up is training.PROFILES["demo"]). Measured on the
# 2-core box: scale 0.025 with 10 rounds took 13.0 min and left 14/25 districts improved (the global model was
# still far from converged); scale 0.0125 with 24 rounds took 12.0 min, 22/25 improved, +92 % on the means;
# with 28 rounds (13.1 min, quiet) 23/25 improved, +100 % on the means.
# Plain FedAvg was the steadiest server optimiser (bench_rounds).
DEMO_FEDERATION = {"rounds": 28, "local_epochs": 1, "server_opt": "fedavg", "eps": 0.0}
DEMO_SCALE = 0.0125         # share of the study's 40,750 samples generated per district
DEMO_MIN_PER_DISTRICT = 8   # tiles per district at least, so every split has a tile


DEMO_STAGES = ("synth", "packs", "local", "federated", "report")
DEMO_MARKER = ".nfed-demo"   # says "nfed demo made this folder": a rerun may replace its stage folders


def claim_demo_folder(out_dir: Path) -> None:
    """Make `out_dir` a demo folder, refusing a non-empty folder that a demo did not make (a rerun deletes the
    stage folders, and must never delete a user's files)."""
    if out_dir.is_dir() and any(path.name != LOCK_NAME for path in out_dir.iterdir()):
        if not (out_dir / DEMO_MARKER).exists() and not (out_dir / "demo.json").exists():
            raise ConfigError(f"{out_dir}: is not empty and not an nfed demo folder; choose a new or empty --out")
    elif out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file; --out needs a folder")
    write_text_atomic(out_dir / DEMO_MARKER, "made by nfed demo; a rerun replaces " + ", ".join(DEMO_STAGES) + "\n")


def _bar(enabled: bool):
    from ..progress import progress

    def show(iterable, length, label):
        return progress(iterable, label=label, length=length, enabled=enabled)

    return show


def run_demo(out_dir: str | Path, *, scale: float = DEMO_SCALE, districts: str = "all", seed: int = 0,
             device: str = "cpu", rounds: int | None = None, local_epochs: int | None = None,
             server_opt: str | None = None, epochs: int | None = None, lr: float | None = None,
             min_per_district: int = DEMO_MIN_PER_DISTRICT, quiet: bool = False, echo=click.echo) -> dict:
    """Run every stage of the study on the demo profile; returns the report's summary with stage times."""
    from ..federation import FederationConfig, federate, find_packs
    from ..pack import pack_folder
    from ..report import make_report, table_text
    from ..synth import synthesise
    from ..training import PROFILE_TILES, profile_config
    from .model import train_district, write_local_csv

    out_dir = Path(out_dir)
    stages: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name):
        stages[name] = round(time.perf_counter() - started - sum(stages.values()), 2)
        echo(f"[demo] {name} done in {stages[name]:.1f} s")

    config = profile_config("demo", seed=seed, device=device, epochs=epochs, lr=lr)
    claim_demo_folder(out_dir)
    for name in DEMO_STAGES:
        shutil.rmtree(out_dir / name, ignore_errors=True)

    echo(f"[demo] generating synthetic districts (scale {scale:g}) -> {out_dir / 'synth'}")
    synthesise(out_dir / "synth", scale=scale, tile=PROFILE_TILES["demo"], seed=seed, districts=districts,
               min_per_district=min_per_district, progress=_bar(not quiet))
    stage("synth")
    pack_folder(out_dir / "synth", out_dir / "packs", seed=seed, progress=_bar(not quiet))
    packs = find_packs(out_dir / "packs")
    stage("pack")

    echo(f"[demo] training every district on its own data -> {out_dir / 'local'}")
    rows = []
    for path in packs.values():
        summary = train_district(path, out_dir / "local", config, quiet=True)
        rows.append(summary)
        echo(f"  {summary['district']:<16} local F1 {summary['f1']:.4f} ({summary['epochs_run']} epochs, "
             f"{summary['wall_time_s']:.1f} s)")
    write_local_csv(out_dir / "local" / "local.csv", rows)
    stage("local")

    fed = dict(DEMO_FEDERATION)
    fed.update({k: v for k, v in {"rounds": rounds, "local_epochs": local_epochs,
                                  "server_opt": server_opt}.items() if v is not None})
    echo(f"[demo] federating {len(packs)} districts: {fed['server_opt']}, {fed['rounds']} rounds of "
         f"{fed['local_epochs']} local epoch(s) -> {out_dir / 'federated'}")
    federate(packs, out_dir / "federated", config, FederationConfig(seed=seed, **fed), echo=echo,
             show_progress=not quiet, overwrite=True)
    stage("federated")

    comparison = make_report(out_dir / "local", out_dir / "federated", out_dir / "report")
    stage("report")
    total = round(sum(stages.values()), 1)
    echo("")
    echo(table_text(comparison))
    echo(f"\n[demo] total wall time {total:.1f} s ({total / 60:.1f} min); report in {out_dir / 'report'}")
    summary = {**{k: v for k, v in comparison.summary.items() if k != "figures"}, "stage_seconds": stages,
               "total_seconds": total,
               "settings": {"scale": scale, "districts": districts, "seed": seed, "device": device,
                            "train": config.to_dict(), "federation": fed}}
    write_json_atomic(out_dir / "demo.json", summary)
    return summary


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("nfed-demo"), show_default=True,
              help="output folder (synth, packs, local, federated, report)")
@click.option("--scale", type=limited("scale"), default=DEMO_SCALE, show_default=True,
              help="share of the study's sample count generated per district")
@click.option("--districts", default="all", show_default=True, help="'all' or comma-separated district names")
@click.option("--rounds", type=limited("rounds"), help=f"federated rounds (default {DEMO_FEDERATION['rounds']})")
@click.option("--local-epochs", type=limited("local_epochs"), help=f"epochs per client per round (default "
                                               f"{DEMO_FEDERATION['local_epochs']})")
@click.option("--server-opt", type=click.Choice(["fedavg", "fedavgm", "fedadam"]), help="server optimiser")
@click.option("--epochs", type=limited("epochs"), help="maximum local-training epochs (demo profile's by default)")
@click.option("--seed", type=limited("seed"), default=0, show_default=True)
@device_option
@precision_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out_dir, scale, districts, rounds, local_epochs, server_opt, epochs, seed, device, precision, quiet):
    """Re-run the whole study on synthetic districts and print the local vs federated table."""
    device = str(backend.parse_device(device))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file; --out needs a folder")
    with RunLock(out_dir):
        run_demo(out_dir, scale=scale, districts=districts, seed=seed, device=device, rounds=rounds,
                 local_epochs=local_epochs, server_opt=server_opt, epochs=epochs, quiet=quiet)
