"""The study's other columns: `nfed train-central` (pooled data) and `nfed personalise` (global model
fine-tuned per district). The local column is `nfed train-local`, the federated one `nfed federate`."""
from __future__ import annotations

import time
from pathlib import Path

import click

from nfed.commands.options import (TRAINING_OPTIONS, apply_options, device_option, precision_option, track_option,
                                   tracked_run, training_setup)
from nfed.common.errors import ConfigError
from nfed.common.paths import refuse_output_over_inputs


def _packs(data_path: Path, out_dir: Path, inputs: dict | None = None) -> list[Path]:
    """The folder's packs (one per district), once the run folder is known not to hold any input."""
    from nfed.runs.packs import find_packs

    if not data_path.is_dir():
        raise ConfigError(f"--data {data_path}: expected the folder of district packs")
    packs = list(find_packs(data_path).values())
    refuse_output_over_inputs(out_dir, {**(inputs or {}), "--data": packs})
    return packs


# What both commands take: the packs, the run folder, the training set-up and where it runs.
COLUMN_OPTIONS = [
    click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
                 help="folder of district packs"),
    click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="run folder"),
    *TRAINING_OPTIONS,
    device_option,
    precision_option,
    track_option,
    click.option("--quiet", is_flag=True, help="no progress bars"),
]


@click.command("train-central")
@apply_options(COLUMN_OPTIONS)
def train_central(data_path, out_dir, device, precision, track, quiet, **options):
    """Train one model on the pooled data of every district (the centralised upper bound).

    Early stopping on the pooled validation splits. Writes OUT/best.h5, OUT/epochs.jsonl, OUT/summary.json
    (epochs, optimiser steps, why it stopped) and OUT/central.csv: the model on each district's test split.
    """
    from nfed.common.progress import duration
    from nfed.training.study import central_column

    config, env = training_setup(device, precision, **options)
    start = time.monotonic()
    packs = _packs(data_path, out_dir)
    with tracked_run(track, out_dir, "train-central", env, train=config) as tracker:
        summary, rows = central_column(packs, out_dir, config, env=env, quiet=quiet)
        if tracker:
            tracker.log_metrics(summary)
            for row in rows:
                tracker.log_district(row)
            tracker.log_artifacts([out_dir / "central.csv", out_dir / "summary.json"])
    for row in rows:
        click.echo(f"{row['district']}: f1 {row['f1']:.4f} ({row['test_tiles']} test tiles)")
    click.echo(f"centralised model: {summary['epochs_run']} epochs, {summary['steps']} steps, stopped by "
               f"{summary['stop']} (best epoch {summary['best_epoch']}) in {duration(time.monotonic() - start)} "
               f"-> {out_dir / 'central.csv'}")


@click.command("personalise")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="the federation's global model (RUN/best.h5 or RUN/global.h5)")
@apply_options(COLUMN_OPTIONS)
def personalise(model_path, data_path, out_dir, device, precision, track, quiet, **options):
    """Fine-tune the global model on each district's own data (the personalised column).

    Each district starts from the global weights with a fresh optimiser and stops early on its validation
    split; when fine-tuning never lowers the validation loss the global weights are kept. The learning rate
    is a tenth of the profile's unless --lr is given. The model's width, classes and lambda-rec come from the
    checkpoint. A run under --norm-policy fedbn / silobn gives each district its own BatchNorm of the checkpoint's
    round (from RUN/client_state/ beside the checkpoint). Writes OUT/<district>/ and OUT/personalised.csv.
    """
    from nfed.common.progress import Countdown
    from nfed.model.checkpoint import load_checkpoint
    from nfed.training.study import fine_tune_config, local_states_of, model_setup, personalised_column
    from nfed.training.trainer import checkpoint_train_config

    packs = _packs(data_path, out_dir, {"--model": model_path})
    checkpoint = load_checkpoint(model_path)
    options.update(model_setup(checkpoint_train_config(checkpoint), options, model_path))
    config, env = training_setup(device, precision, **options)
    if options.get("lr") is None:
        config = fine_tune_config(config)

    countdown = Countdown(len(packs))

    def said(row: dict) -> None:
        kept = " (global weights kept)" if row["best_epoch"] == 0 else ""
        click.echo(f"{row['district']}: f1 {row['f1']:.4f} ({row['epochs_run']} epochs, {row['steps']} steps, "
                   f"stopped by {row['stop']}){kept}; {countdown.step()}")
        if tracker:
            tracker.log_district(row)

    with tracked_run(track, out_dir, "personalise", env, train=config, model=str(model_path)) as tracker:
        rows = personalised_column(checkpoint.model_state, packs, out_dir, config, env=env, quiet=quiet,
                                   source=str(model_path), on_row=said,
                                   local_states=local_states_of(checkpoint, model_path))
        if tracker:
            tracker.log_artifacts([out_dir / "personalised.csv"])
    click.echo(f"wrote {out_dir / 'personalised.csv'} ({len(rows)} districts)")
