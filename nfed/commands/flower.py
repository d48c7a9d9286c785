"""`nfed flower-app`: write the Flower app folder that runs nfed's federation on a SuperLink + SuperNodes
(the folder's contents are nfed.federation.flower.appdir's); `nfed flower-gateway`: the SuperLink's one public door,
which relays the Fleet API alone (nfed.federation.flower.gateway)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from nfed.commands.federation import CLIENT_TRAINING
from nfed.commands.options import config_options, limited, run_folder_options, track_option, training_options
from nfed.common.paths import refuse_output_over_inputs
from nfed.federation.config import FederationConfig

# FederationConfig fields a Flower deployment has no option for: in-process worker pools, client state kept between
# rounds, the testing-only attack simulation, held-out districts (nfed federate and demo only), and --deadline,
# which is Flower's own (default 600 s, 0 waits for every node).
IN_PROCESS_ONLY = ("workers", "gpus", "client_state", "simulate_attack", "attackers", "hold_out", "deadline")


@click.command("flower-app")
@click.option("--out", "app_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="folder to write the Flower app into (pass it to `flwr run`)")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="run folder the ServerApp writes, on the SuperLink's machine (default: APP_DIR-run beside it)")
@training_options(into="train_config", only=CLIENT_TRAINING)
@config_options(FederationConfig, into="config", exclude=IN_PROCESS_ONLY)
@click.option("--deadline", "flower_deadline", type=limited("flower_deadline"), default=600.0, show_default=True,
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
@run_folder_options("--run-dir")
@track_option
def flower_app(app_dir, run_dir, train_config, config, flower_deadline, eval_deadline, district_names, districts_file,
               expected_nodes, connect_timeout, resume, overwrite, track):
    """Write a Flower app folder that runs `nfed federate`'s protocol on a SuperLink and one SuperNode per
    district.

    Each SuperNode trains on the pack named in its node config (`--node-config 'pack="/data/X.h5"'`); the
    ServerApp writes the same RUN/rounds.jsonl, RUN/global.h5 (every round), RUN/federated.csv and
    RUN/status.json as `nfed federate`. Run it with `flwr run APP_DIR CONNECTION --stream`, then check
    `nfed status RUN` (flwr run exits 0 even when the run failed).
    """
    from nfed.federation.flower.appdir import write_flower_app
    from nfed.federation.roster import read_allow_list

    refuse_output_over_inputs(app_dir, {"--districts-file": districts_file})
    districts = read_allow_list(district_names, districts_file)

    app_dir = Path(app_dir)
    run_dir = run_dir if run_dir is not None else app_dir.parent / f"{app_dir.name}-run"
    train_config = train_config.replace(seed=config.seed)
    config = dataclasses.replace(config, deadline=flower_deadline or None)
    path = write_flower_app(app_dir, train_config, config, run_dir=run_dir, resume=resume, overwrite=overwrite,
                            expected_nodes=expected_nodes, connect_timeout=connect_timeout,
                            eval_deadline=eval_deadline, districts=districts, track=track)
    click.echo(f"wrote {path}: {config.aggregator}" + (" under secure aggregation" if config.secure_aggregation
                                                      else "") + f" + {config.server_opt}, up to {config.rounds} "
               "round(s), deadline " + (f"{config.deadline:g} s" if config.deadline else "none")
               + (f", districts {', '.join(districts)}" if districts else ", any district")
               + f"; run folder {Path(run_dir).resolve()}")
    click.echo(f"run it with: flwr run {app_dir} <connection> --stream")


@click.command("flower-gateway")
@click.option("--listen", required=True,
              help="HOST:PORT the SuperNodes connect to (e.g. 0.0.0.0:9092); give them this as --superlink")
@click.option("--superlink", default="127.0.0.1:9091", show_default=True,
              help="the SuperLink's HOST:PORT, on loopback or an admin network that no district reaches")
@click.option("--ssl-certfile", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="certificate the gateway presents (the SuperLink's server.pem; its subjectAltName holds the "
                   "name or address the SuperNodes use)")
@click.option("--ssl-keyfile", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="its private key (server.key)")
@click.option("--root-certificates", "ca_certfile", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="the CA certificate (ca.crt) the SuperLink's certificate is checked against")
@click.option("--max-request-mib", type=click.IntRange(1, 1 << 20), default=1024, show_default=True,
              help="largest request relayed, in MiB (a model travels in 5 MB chunks; a secure-aggregation "
                   "update in one piece of 8 bytes per parameter)")
def flower_gateway(listen, superlink, ssl_certfile, ssl_keyfile, ca_certfile, max_request_mib):
    """Relay the Flower Fleet API, and nothing else, to a SuperLink that listens on loopback.

    flwr 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr supernode register`) and the
    ServerApps' runtime API on the SuperLink's one port, and checks no operator identity: anyone who reaches it
    with ca.crt registers nodes and runs code. Start the SuperLink with --host 127.0.0.1 and this gateway on the
    address the districts reach: other requests get 403 (logged on stderr). Stop it with SIGTERM or Ctrl-C.
    """
    from nfed.federation.flower.gateway import FleetGateway, parse_endpoint

    gateway = FleetGateway(parse_endpoint(listen, "--listen"), parse_endpoint(superlink, "--superlink"),
                           certfile=ssl_certfile, keyfile=ssl_keyfile, ca_certfile=ca_certfile,
                           max_request_bytes=max_request_mib << 20)
    click.echo(f"nfed flower-gateway: relaying the Fleet API from {gateway.address} to the SuperLink at "
               f"{gateway.superlink}; every other request is refused", err=True)
    try:
        gateway.serve_forever()
    except KeyboardInterrupt:   # SIGTERM (nfed's handler raises a KeyboardInterrupt) or Ctrl-C: a normal stop
        pass
    finally:
        gateway.server.server_close()
