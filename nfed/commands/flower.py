"""`nfed flower-app`: write the Flower app folder that runs nfed's federation on a SuperLink + SuperNodes.

The folder holds only pyproject.toml: its [tool.flwr.app.components] point at nfed.federation.flower's ServerApp and
ClientApp (the code lives in the installed nfed package on every machine), and [tool.flwr.app.config] holds
the federation set-up, overridable per run with `flwr run APP_DIR CONNECTION --run-config 'rounds=5'`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from nfed import __version__
from nfed.common.atomic import write_text_atomic
from nfed.common.errors import ConfigError
from nfed.commands.federation import protocol_options
from nfed.commands.options import limited

APP_NAME = "nfed-flower"
PUBLISHER = "nfed"
FLWR_REQUIREMENT = "flwr>=1.42,<1.43"


def toml_value(value) -> str:
    """A TOML literal for a str, bool, int or float (JSON string escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) into a Flower run config")


def pyproject_text(run_config: dict) -> str:
    """pyproject.toml of the Flower app: metadata, components and the (one level nested) run config."""
    lines = [
        "# Written by `nfed flower-app`: a Flower app whose ServerApp and ClientApp are nfed's "
        "(nfed.federation.flower).",
        "# Every machine (SuperLink and each SuperNode) needs nfed with its flower extra; start the SuperLink",
        "# with --disable-runtime-dependency-installation so Flower uses that installation as it is.",
        "[project]",
        f"name = {toml_value(APP_NAME)}",
        f"version = {toml_value(__version__)}",
        'description = "nfed: federated building-change detection (W-Net-CD, FedAvg) over Flower"',
        'license = "MIT"',
        f"dependencies = [{toml_value(FLWR_REQUIREMENT)}, {toml_value('nfed[flower]==' + __version__)}]",
        "",
        "[tool.flwr.app]",
        f"publisher = {toml_value(PUBLISHER)}",
        "",
        "[tool.flwr.app.components]",
        'serverapp = "nfed.federation.flower:server_app"',
        'clientapp = "nfed.federation.flower:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    tables = {key: value for key, value in run_config.items() if isinstance(value, dict)}
    lines += [f"{key} = {toml_value(value)}" for key, value in run_config.items() if key not in tables]
    for table, values in tables.items():
        lines += ["", f"[tool.flwr.app.config.{table}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_flower_app(app_dir: Path, run_config: dict) -> Path:
    """Write APP_DIR/pyproject.toml atomically; returns its path."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    path = app_dir / "pyproject.toml"
    write_text_atomic(path, pyproject_text(run_config))
    return path


@click.command("flower-app")
@click.option("--out", "app_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="folder to write the Flower app into (pass it to `flwr run`)")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="run folder the ServerApp writes, on the SuperLink's machine (default: APP_DIR-run beside it)")
@protocol_options
@click.option("--deadline", type=limited("flower_deadline"), default=600.0, show_default=True,
              help="seconds a round waits for the SuperNodes' replies; later ones are left out (0: wait for all)")
@click.option("--eval-deadline", type=limited("flower_deadline"), default=120.0, show_default=True,
              help="seconds an evaluation waits for the SuperNodes' replies (0: wait for all)")
@click.option("--districts", "district_names", default=None,
              help="allow-list: comma-separated districts that may take part (others, and duplicates, are refused)")
@click.option("--districts-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="the allow-list as a file: one district per line, # starts a comment")
@click.option("--expected-nodes", type=limited("expected_nodes"), default=0, show_default=True,
              help="wait for this many SuperNodes before the first round (at least --min-clients)")
@click.option("--connect-timeout", type=limited("connect_timeout"), default=300.0, show_default=True,
              help="seconds to wait for the expected SuperNodes to connect")
@click.option("--no-round-eval", is_flag=True,
              help="skip evaluating the global model on every validation split after each round")
@click.option("--resume", is_flag=True, help="continue the run in --run-dir from its last finished round")
@click.option("--overwrite", is_flag=True, help="replace a run already in --run-dir (its results are deleted)")
@click.option("--seed", type=limited("seed"), default=0, show_default=True)
@click.option("--secure-aggregation", is_flag=True,
              help="Flower's SecAgg+: the ServerApp learns only the sum of the updates (needs --aggregator fedavg)")
@click.option("--secagg-range", type=limited("secagg_range"), default=8.0, show_default=True,
              help="secure aggregation: each update coordinate is clipped to +-this before quantisation "
                   "(--dp-clip, when set, is used instead)")
def flower_app(app_dir, run_dir, profile, rounds, local_epochs, eps, patience_rounds, warmup_rounds, delta, deadline,
               fraction, min_clients, eval_deadline, district_names, districts_file, expected_nodes, connect_timeout,
               server_opt, server_lr, server_momentum, lr, batch_size, width, no_round_eval, resume, overwrite, seed,
               **defences):
    """Write a Flower app folder that runs `nfed federate`'s protocol on a SuperLink and one SuperNode per
    district.

    Each SuperNode trains on the pack named in its node config (`--node-config 'pack="/data/X.h5"'`); the
    ServerApp writes the same RUN/rounds.jsonl, RUN/global.h5 (every round), RUN/federated.csv and
    RUN/status.json as `nfed federate`. Run it with `flwr run APP_DIR CONNECTION --stream`, then check
    `nfed status RUN` (flwr run exits 0 even when the run failed).
    """
    from nfed.federation.config import FederationConfig
    from nfed.training.trainer import profile_config

    if resume and overwrite:
        raise ConfigError("--resume continues the run in --run-dir, --overwrite replaces it: give one of them")
    districts = allow_list(district_names, districts_file)

    app_dir = Path(app_dir)
    run_dir = run_dir if run_dir is not None else app_dir.parent / f"{app_dir.name}-run"
    train_config = profile_config(profile, lr=lr, batch_size=batch_size, width=width, seed=seed)
    config = FederationConfig(rounds=rounds, local_epochs=local_epochs, eps=eps, patience_rounds=patience_rounds,
                              warmup_rounds=warmup_rounds,
                              delta=delta, deadline=deadline if deadline > 0 else None, fraction=fraction,
                              min_clients=min_clients, server_opt=server_opt, server_lr=server_lr,
                              server_momentum=server_momentum, seed=seed, evaluate_rounds=not no_round_eval,
                              **defences)
    path = write_flower_app(app_dir, flower_run_config(train_config, config, run_dir=run_dir, resume=resume,
                                                       overwrite=overwrite, expected_nodes=expected_nodes,
                                                       connect_timeout=connect_timeout,
                                                       eval_deadline=eval_deadline, districts=districts))
    click.echo(f"wrote {path}: {config.aggregator}" + (" under secure aggregation" if config.secure_aggregation
                                                      else "") + f" + {server_opt}, up to {rounds} round(s), deadline "
               + (f"{deadline:g} s" if deadline > 0 else "none")
               + (f", districts {', '.join(districts)}" if districts else ", any district")
               + f"; run folder {Path(run_dir).resolve()}")
    click.echo(f"run it with: flwr run {app_dir} <connection> --stream")


def allow_list(names: str | None, path: Path | None) -> list[str] | None:
    """The districts of --districts or --districts-file (None when neither is given)."""
    from nfed.federation.roster import parse_allow_list

    if names is not None and path is not None:
        raise ConfigError("--districts and --districts-file: give one of them")
    if names is not None:
        return parse_allow_list([name.strip() for name in names.split(",") if name.strip()], "--districts")
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--districts-file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--districts-file: {path} is unreadable ({str(exc)[:120]})") from None
    return parse_allow_list([line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()],
                            f"--districts-file {path}")


def flower_run_config(train_config, fed_config, **options) -> dict:
    """nfed.federation.flower's run configuration (imports flwr: a clear error where it is not installed)."""
    try:
        from nfed.federation.flower_config import run_config_for
    except ImportError as exc:
        if getattr(exc, "name", "") and str(exc.name).startswith("flwr"):
            raise ConfigError("nfed flower-app needs Flower (flwr 1.42): install nfed with its flower extra, e.g. "
                              "pip install '/path/to/nfed[flower]' or 'nfed-0.1.0-py3-none-any.whl[flower]'") from None
        raise
    return run_config_for(train_config, fed_config, **options)
