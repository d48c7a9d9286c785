"""Federation commands: `nfed federate` (rounds of FedAvg over district packs) and `nfed report`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from nfed.commands.options import (config_options, device_option, precision_option, run_environment,
                                   run_folder_options, track_option, tracked_run, training_options)
from nfed.common.errors import ConfigError
from nfed.common.paths import refuse_output_over_inputs
from nfed.federation.config import FederationConfig


# FederationConfig fields whose options only `nfed flower-app` takes (Flower's SecAgg+).
FLOWER_ONLY = ("secure_aggregation", "secagg_range")
# The client set-up both federate and flower-app take, beside --profile (the seed is the federation's).
CLIENT_TRAINING = ("lr", "batch_size", "width")


@click.command("federate")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="folder of district packs (<district>.h5), one client each")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="run folder")
@training_options(into="train_config", only=CLIENT_TRAINING)
@config_options(FederationConfig, into="config", exclude=FLOWER_ONLY)
@click.option("--client-speeds", default=None,
              help="relative client speeds: 'uniform', 'study' (3 tiers) or a JSON/CSV file district -> speed; "
                   "simulated times = compute time / speed, checked against --deadline")
@run_folder_options("--out")
@device_option
@precision_option
@track_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def federate(data_dir, run_dir, train_config, config, client_speeds, resume, overwrite, device, precision, track,
             quiet):
    """Federated training over district packs (FedAvg weighted by sample count), one line per round.

    Writes RUN/rounds.jsonl, an atomic checkpoint RUN/global.h5 after every round (--resume continues from
    it with the same result as an uninterrupted run) and RUN/federated.csv: the global model on every
    district's test split (district, samples, precision, recall, f1, iou). One run at a time per folder; a
    folder holding a run is only replaced with --overwrite.
    """
    from nfed.federation.config import load_client_speeds
    from nfed.federation.server import federate as run_federation
    from nfed.runs.packs import find_packs
    from nfed.training.trainer import require_memory

    env = run_environment(device, precision)
    if config.gpus and device is None:
        env = env.on_gpu(config.gpus[0])
    train_config = train_config.replace(seed=config.seed)
    require_memory(train_config, env.device)
    packs = find_packs(data_dir)
    speeds_file = client_speeds if client_speeds and Path(client_speeds).exists() else None
    refuse_output_over_inputs(run_dir, {"--data": list(packs.values()), "--client-speeds": speeds_file})
    config = dataclasses.replace(config, client_speeds=load_client_speeds(client_speeds, list(packs)))
    # said by the run once it holds and checked the folder (a refused run says nothing of it)
    plan = (f"federating {len(packs)} district(s) from {data_dir}: {config.aggregator} + {config.server_opt}, up to "
            f"{config.rounds} round(s) of {config.local_epochs} local epoch(s), device {env.device}, precision "
            f"{env.precision}" + (f", deadline {config.deadline:g} s" if config.deadline else ""))
    with tracked_run(track, run_dir, "federate", env, train=train_config, federation=config) as tracker:
        result = run_federation(packs, run_dir, train_config, config, resume=resume, overwrite=overwrite,
                                echo=click.echo, plan=plan, show_progress=not quiet, env=env,
                                on_round=tracker.log_round if tracker else None)
        if tracker:
            for row in result.results:
                tracker.log_district(row)
            tracker.log_artifacts(run_dir / name for name in ("summary.json", "federated.csv", "rounds.jsonl"))
    f1 = [row["f1"] for row in result.results]
    click.echo(f"wrote {run_dir / 'federated.csv'}: mean test F1 {sum(f1) / max(len(f1), 1):.4f} over "
               f"{len(f1)} district(s); global weights in {run_dir / 'global.h5'}")


@click.command("report")
@click.option("--run", "run_dirs", multiple=True, type=click.Path(path_type=Path),
              help="study run folder (local/, federated/, personalised/, central/); repeat it for several seeds")
@click.option("--local", "local_run", type=click.Path(path_type=Path),
              help="train-local --all run folder (or its local.csv), instead of --run")
@click.option("--federated", "federated_run", type=click.Path(path_type=Path),
              help="federate run folder (or its federated.csv), with --local")
@click.option("--personalised", "personalised_run", type=click.Path(path_type=Path),
              help="personalised results folder (or its personalised.csv), with --local")
@click.option("--centralised", "centralised_run", type=click.Path(path_type=Path),
              help="centralised results folder (or its central.csv), with --local")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="report folder")
@click.option("--no-figures", is_flag=True, help="skip the PNG figures")
def report(run_dirs, local_run, federated_run, personalised_run, centralised_run, out_dir, no_figures):
    """Compare local, federated, personalised and centralised F1 per district beside the study's Table 4, with
    a fairness section and, over several --run seeds, intervals and paired tests (table.csv, table.md,
    summary.json, figures, and all of it on one page: report.html). Each unfairness found is a `warning:` line
    on stderr."""
    from nfed.report.build import make_report, make_study_report, table_text
    from nfed.runs.results import FILE_NAMES, study_table

    files = {"--local": local_run, "--federated": federated_run, "--personalised": personalised_run,
             "--centralised": centralised_run}
    if run_dirs and any(files.values()):
        raise ConfigError("give either --run RUN (repeatable) or --local/--federated results, not both")
    if not run_dirs and (local_run is None or federated_run is None):
        raise ConfigError("give --run RUN, or both --local and --federated")
    read = [folder for run in run_dirs for folder in [run, *(study_table(run, kind).parent for kind in FILE_NAMES)]]
    refuse_output_over_inputs(out_dir, {"--run": read, **files})
    figures = not no_figures
    if run_dirs:
        comparison = make_study_report(run_dirs, out_dir, figures=figures)
    else:
        comparison = make_report(local_run, federated_run, out_dir, personalised=personalised_run,
                                 centralised=centralised_run, figures=figures)
    click.echo(table_text(comparison))
    for warning in comparison.summary["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {out_dir / 'table.csv'}, {out_dir / 'table.md'}, {out_dir / 'summary.json'}, "
               f"{out_dir / 'report.html'}" + ("" if no_figures else " and figures"))
