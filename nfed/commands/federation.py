"""Federation commands: `nfed federate` (rounds of FedAvg over district packs) and `nfed report`."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.commands.options import device_option, limited, precision_option, run_environment
from nfed.common.atomic import new_folder
from nfed.common.errors import ConfigError
from nfed.common.paths import refuse_output_over_inputs
from nfed.common.validate import check_number


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); empty -> ()."""
    if not text:
        return ()
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--gpus '{text}': expected comma-separated GPU ids such as 0,1,2") from None
    return tuple(check_number("--gpus", g, "gpu") for g in gpus)


# Options of the federated protocol shared by `nfed federate` and `nfed flower-app` (same names, same defaults).
PROTOCOL_OPTIONS = [
    click.option("--profile", type=click.Choice(["demo", "paper"]), default="demo", show_default=True,
                 help="model/optimiser set-up sent to the clients (see train-local)"),
    click.option("--rounds", type=limited("rounds"), default=20, show_default=True, help="round budget"),
    click.option("--local-epochs", type=limited("local_epochs"), default=1, show_default=True,
                 help="epochs per client per round"),
    click.option("--eps", type=limited("eps"), default=1e-3, show_default=True,
                 help="stop when ||w_r+1 - w_r|| / ||w_r|| < eps (0 disables)"),
    click.option("--patience-rounds", type=limited("patience_rounds"), default=0, show_default=True,
                 help="stop when the validation loss has not improved by --delta for this many rounds (0 disables)"),
    click.option("--warmup-rounds", type=limited("warmup_rounds"), default=0, show_default=True,
                 help="no stop rule fires (or counts a stale round) in these first rounds"),
    click.option("--delta", type=limited("delta"), default=0.0, show_default=True,
                 help="minimum validation-loss improvement"),
    click.option("--fraction", type=limited("fraction"), default=1.0, show_default=True,
                 help="share of the districts sampled per round (seeded)"),
    click.option("--min-clients", type=limited("min_clients"), default=1, show_default=True,
                 help="a round with fewer responders keeps the previous global weights"),
    click.option("--server-opt", type=click.Choice(["fedavg", "fedavgm", "fedadam"]), default="fedavg",
                 show_default=True, help="server optimiser (FedAvgM: server momentum; FedAdam: Adam on the server)"),
    click.option("--server-lr", type=limited("server_lr"), default=None,
                 help="server learning rate (fedavg/fedavgm 1, fedadam 0.01)"),
    click.option("--server-momentum", type=limited("server_momentum"), default=0.9, show_default=True,
                 help="FedAvgM momentum"),
    click.option("--lr", type=limited("lr"), help="client learning rate (profile's by default)"),
    click.option("--batch-size", type=limited("batch_size")),
    click.option("--width", type=limited("width"), help="W-Net base width w"),
]

# Defences against hostile updates and leaked updates (FederationConfig fields of the same names).
DEFENCE_OPTIONS = [
    click.option("--aggregator", type=click.Choice(["fedavg", "median", "trimmed-mean", "multi-krum", "clipped"]),
                 default="fedavg", show_default=True,
                 help="how updates are combined: FedAvg (streams), or robust to hostile clients (hold every update)"),
    click.option("--trim-beta", type=limited("trim_beta"), default=0.2, show_default=True,
                 help="trimmed-mean: share of values dropped at each end, per coordinate"),
    click.option("--krum-f", type=limited("krum_f"), default=1, show_default=True,
                 help="multi-krum: hostile clients tolerated"),
    click.option("--krum-m", type=limited("krum_m"), default=0, show_default=True,
                 help="multi-krum: updates averaged (0: n - f)"),
    click.option("--clip-factor", type=limited("clip_factor"), default=1.0, show_default=True,
                 help="clipped: delta norms clipped to this multiple of the round's median delta norm"),
    click.option("--max-sample-share", type=limited("max_sample_share"), default=1.0, show_default=True,
                 help="no client weighs more than this share of a round (1: no share cap). A claim above the count "
                      "its pack announced when it joined, or its registered count, is always capped"),
    click.option("--dp-clip", type=limited("dp_clip"), default=0.0, show_default=True,
                 help="DP-FedAvg: each client clips its update to this L2 norm (0: no differential privacy)"),
    click.option("--dp-noise", type=limited("dp_noise"), default=0.0, show_default=True,
                 help="DP-FedAvg: Gaussian noise multiplier z (noise std z * dp-clip on the sum)"),
    click.option("--dp-delta", type=limited("dp_delta"), default=None,
                 help="delta of the privacy accounting (default: 1 / the districts' training samples)"),
]


# The clients' local objective (FederationConfig fields of the same names).
CLIENT_OPTIONS = [
    click.option("--prox-mu", type=limited("prox_mu"), default=0.0, show_default=True,
                 help="FedProx: each client adds mu/2 ||w - w_global||^2 over the trainable weights to its loss "
                      "(0: plain FedAvg)"),
]


def protocol_options(command):
    """Apply PROTOCOL_OPTIONS (profile, rounds, local epochs, stop rules, sampling, server optimiser, client
    set-up), DEFENCE_OPTIONS (aggregator, sample-count cap, DP-FedAvg) and CLIENT_OPTIONS (FedProx); the last two
    are passed on as keyword arguments named like FederationConfig's fields) to a click command."""
    for option in reversed(PROTOCOL_OPTIONS + DEFENCE_OPTIONS + CLIENT_OPTIONS):
        command = option(command)
    return command


@click.command("federate")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="folder of district packs (<district>.h5), one client each")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="run folder")
@protocol_options
@click.option("--deadline", type=limited("deadline"), default=None,
              help="seconds a round waits for its clients; later ones are left out of the round")
@click.option("--workers", type=limited("workers"), default=0, show_default=True,
              help="run clients in N parallel worker processes with a real deadline (0/1: in turn, in process)")
@click.option("--gpus", default="", help="spread worker clients over these GPUs round-robin, e.g. 0,1,2")
@click.option("--client-state", type=click.Choice(["reset", "keep"]), default="reset", show_default=True,
              help="keep: each client keeps its Adam state between rounds (stored in RUN/client_state)")
@click.option("--client-speeds", default=None,
              help="relative client speeds: 'uniform', 'study' (3 tiers) or a JSON/CSV file district -> speed; "
                   "simulated times = compute time / speed, checked against --deadline")
@click.option("--no-round-eval", is_flag=True,
              help="skip evaluating the global model on every validation split after each round")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last finished round")
@click.option("--overwrite", is_flag=True, help="replace the run already in --out (its results are deleted)")
@click.option("--seed", type=limited("seed"), default=0, show_default=True)
@click.option("--simulate-attack", type=click.Choice(["sign-flip", "noise", "scaled", "label-flip",
                                                      "sample-inflation"]), default=None,
              help="TESTING ONLY: --attackers seeded districts send hostile updates of this kind")
@click.option("--attackers", type=limited("attackers"), default=0, show_default=True,
              help="TESTING ONLY: number of simulated attackers")
@device_option
@precision_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def federate(data_dir, run_dir, profile, rounds, local_epochs, eps, patience_rounds, warmup_rounds, delta, deadline,
             fraction, min_clients, workers, gpus, server_opt, server_lr, server_momentum, client_state, client_speeds,
             lr, batch_size, width, no_round_eval, resume, overwrite, seed, device, precision, quiet, **defences):
    """Federated training over district packs (FedAvg weighted by sample count), one line per round.

    Writes RUN/rounds.jsonl, an atomic checkpoint RUN/global.h5 after every round (--resume continues from
    it with the same result as an uninterrupted run) and RUN/federated.csv: the global model on every
    district's test split (district, samples, precision, recall, f1, iou). One run at a time per folder; a
    folder holding a run is only replaced with --overwrite.
    """
    from nfed.federation.config import FederationConfig, load_client_speeds
    from nfed.federation.server import federate as run_federation
    from nfed.runs.packs import find_packs
    from nfed.runs.runfolder import check_run_folder
    from nfed.runs.runlock import RunLock
    from nfed.training.trainer import profile_config, require_memory

    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")

    gpu_ids = parse_gpus(gpus)
    env = run_environment(f"cuda:{gpu_ids[0]}" if gpu_ids and device is None else device, precision)
    train_config = profile_config(profile, lr=lr, batch_size=batch_size, width=width, seed=seed)
    require_memory(train_config, env.device)
    packs = find_packs(data_dir)
    speeds_file = client_speeds if client_speeds and Path(client_speeds).exists() else None
    refuse_output_over_inputs(run_dir, {"--data": list(packs.values()), "--client-speeds": speeds_file})
    config = FederationConfig(rounds=rounds, local_epochs=local_epochs, eps=eps, patience_rounds=patience_rounds,
                              warmup_rounds=warmup_rounds,
                              delta=delta, deadline=deadline, fraction=fraction, min_clients=min_clients,
                              workers=workers, server_opt=server_opt, server_lr=server_lr,
                              server_momentum=server_momentum, client_state=client_state,
                              client_speeds=load_client_speeds(client_speeds, list(packs)), seed=seed,
                              gpus=gpu_ids, evaluate_rounds=not no_round_eval, **defences)
    with new_folder(run_dir), RunLock(run_dir):  # the plan comes from the run that holds the folder, not a refused one
        check_run_folder(run_dir, resume, overwrite)
        click.echo(f"federating {len(packs)} district(s) from {data_dir}: {config.aggregator} + {server_opt}, "
                   f"up to {rounds} round(s) of {local_epochs} local epoch(s), device {env.device}, precision "
                   f"{env.precision}" + (f", deadline {deadline:g} s" if deadline else ""))
        result = run_federation(packs, run_dir, train_config, config, resume=resume, overwrite=overwrite,
                                echo=click.echo, show_progress=not quiet, env=env)
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
