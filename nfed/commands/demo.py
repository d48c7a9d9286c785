"""`nfed demo`: the whole synthetic study (synth, pack, local, federated, personalised, centralised, report)."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.commands.options import (device_option, field_option, limited, precision_option, run_environment,
                                   track_option, tracked_run)
from nfed.common.errors import ConfigError
from nfed.demo import DemoSettings, claim_demo_folder, run_demo, settings_with
from nfed.federation.config import FederationConfig
from nfed.runs.runlock import RunLock
from nfed.training.trainer import TrainConfig

DEFAULTS = DemoSettings()


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("nfed-demo"), show_default=True,
              help="output folder (synth, packs, then local, federated, personalised, central, report)")
@click.option("--scale", type=limited("scale"), default=DEFAULTS.scale, show_default=True,
              help="share of the study's sample count generated per district as training tiles")
@click.option("--val-tiles", type=limited("eval_tiles"), default=DEFAULTS.val_tiles, show_default=True,
              help="validation tiles per district (fixed, whatever --scale)")
@click.option("--test-tiles", type=limited("eval_tiles"), default=DEFAULTS.test_tiles, show_default=True,
              help="test tiles per district (fixed, whatever --scale)")
@click.option("--districts", default="all", show_default=True, help="'all' or comma-separated district names")
@click.option("--seeds", type=limited("seeds"), default=1, show_default=True,
              help="number of training seeds (model initialisation and shuffling) on the same data")
@field_option(FederationConfig, "seed", help="first training seed")
@click.option("--data-seed", type=limited("seed"), default=0, show_default=True,
              help="seed of the synthetic data and split")
@field_option(FederationConfig, "rounds", override=True,
              help=f"round budget of the federation (default {DEFAULTS.max_rounds}; the validation-loss rule "
                   f"normally ends it first)")
@field_option(FederationConfig, "patience_rounds", override=True,
              help=f"federation stops when the mean validation loss has not improved for this many rounds "
                   f"(default {DEFAULTS.patience_rounds})")
@field_option(FederationConfig, "warmup_rounds", override=True,
              help=f"no stop rule fires in these first rounds (default {DEFAULTS.warmup_rounds})")
@field_option(FederationConfig, "select_by", override=True,
              help=f"which round's global model is kept and scored (default {DEFAULTS.select_by})")
@field_option(FederationConfig, "select_window", override=True,
              help=f"rounds in the moving average of --select-by loss-ma / f1-ma (default {DEFAULTS.select_window})")
@field_option(FederationConfig, "local_epochs", override=True,
              help=f"epochs per client per round (default {DEFAULTS.local_epochs})")
@field_option(FederationConfig, "server_opt", override=True, help="server optimiser")
@field_option(FederationConfig, "prox_mu", override=True,
              help="FedProx weight of the federated clients (default 0: FedAvg)")
@field_option(FederationConfig, "norm_policy", override=True)
@field_option(FederationConfig, "compress", override=True)
@field_option(FederationConfig, "broadcast", override=True)
@field_option(FederationConfig, "hold_out", override=True)
@field_option(TrainConfig, "epochs", override=True,
              help="epoch cap of the local, personalised and centralised training (default "
                   f"{DEFAULTS.epochs}; never below rounds x local epochs, what a client trains in the whole "
                   f"federation)")
@field_option(TrainConfig, "lr", override=True, help="learning rate (demo profile's by default)")
@device_option
@precision_option
@click.option("--jobs", type=limited("jobs"), default=0, show_default=True,
              help="districts trained at once in the local and personalised columns (0: one per CPU core)")
@click.option("--matrix/--no-matrix", default=DEFAULTS.matrix, show_default=True,
              help="score every local model and the global model on every district's test split (RUN/matrix.csv)")
@track_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out_dir, seeds, seed, rounds, device, precision, jobs, track, **settings):
    """Re-run the whole study on synthetic districts: local, federated, personalised and centralised F1."""
    env = run_environment(device, precision)
    settings = settings_with(DEFAULTS, **settings, seeds=tuple(range(seed, seed + seeds)), max_rounds=rounds,
                             device=str(env.device), precision=env.precision, jobs=jobs or None)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file; --out needs a folder")
    with RunLock(out_dir):
        claim_demo_folder(out_dir)   # before a tracking store beside the run makes the folder non-empty
        with tracked_run(track, out_dir, "demo", env, demo=settings.to_dict()) as tracker:
            summary = run_demo(out_dir, settings, echo=click.echo, warn=lambda line: click.echo(line, err=True))
            if tracker:
                _track_columns(tracker, out_dir, summary)


def _track_columns(tracker, out_dir: Path, summary: dict) -> None:
    """One tracked run for the whole demo: each column's per-district rows as <column>_<metric>/<district> at
    step = the seed, and the report."""
    from nfed.runs.results import FILE_NAMES, read_results, study_table

    for step, run_dir in zip(summary["settings"]["seeds"], summary["runs"]):
        for kind in FILE_NAMES:
            if study_table(run_dir, kind).is_file():
                for district, row in read_results(study_table(run_dir, kind)).items():
                    tracker.log_district({"district": district, **row}, prefix=kind, step=step)
    report = out_dir / "report"
    tracker.log_artifacts([out_dir / "demo.json", report / "summary.json", report / "report.html",
                           report / "table.md", report / "table.csv"])
