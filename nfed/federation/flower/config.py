"""The run configuration of nfed's Flower app ([tool.flwr.app.config], written by `nfed flower-app`): the
federation options (`rounds`, `deadline`, `eval-deadline`, `min-clients`, `districts`, ...) and, under
`train.`, the TrainConfig the clients train with; read back by the ServerApp into FlowerRunSettings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from nfed.common.errors import ConfigError
from nfed.common.fields import declared_fields, value_type
from nfed.common.validate import check_number
from nfed.federation.config import FederationConfig
from nfed.federation.roster import parse_allow_list
from nfed.training.trainer import TrainConfig

# Run-config keys of the federation options, from FederationConfig's declarations: key -> (field, type). TOML has
# no None: a field whose default is None is written as 0, and 0 reads back as None.
FEDERATION_KEYS = {found.flower_key: (field.name, value_type(FederationConfig, field.name))
                   for field, found in declared_fields(FederationConfig) if found.flower_key}
# Keys added after the first Flower version: an app folder written before them loads with the fields' defaults.
OPTIONAL_KEYS = tuple(found.flower_key for _, found in declared_fields(FederationConfig)
                      if found.flower_key and found.optional_in_flower)
UNSET_AS_ZERO = tuple(field.name for field, found in declared_fields(FederationConfig)
                      if found.flower_key and field.default is None)
TRAIN_PREFIX = "train."


TRACK_OFF, TRACK_BESIDE_RUN = "off", "beside-run"   # the run config's `track` without a URI


@dataclass
class FlowerRunSettings:
    """Everything a Flower run of nfed needs, read from the run configuration."""

    run_dir: Path
    resume: bool
    overwrite: bool
    expected_nodes: int
    connect_timeout: float
    train_config: object
    federation_config: object
    eval_deadline: float | None = None      # seconds an evaluation waits for the nodes (None: for all)
    districts: list[str] | None = None      # the allow-list (None: any district)
    track: str | None = None                # MLflow: None not tracked, "" a store beside the run, else a URI


def run_config_for(train_config, fed_config, *, run_dir: Path, resume: bool = False, overwrite: bool = False,
                   expected_nodes: int = 0, connect_timeout: float = 300.0, eval_deadline: float | None = None,
                   districts: Sequence[str] | None = None, track: str | None = None) -> dict:
    """The nested [tool.flwr.app.config] table for a TrainConfig + FederationConfig (TOML-friendly): the
    evaluation deadline defaults to the training deadline, and 0 waits for every node; an empty `districts`
    admits any district; `track` (--track [URI]) is written as "off", "beside-run" or the URI."""
    federation = fed_config.to_dict()
    if federation.get("client_state", "reset") != "reset":
        raise ConfigError("over Flower each round starts the clients' optimisers afresh (--client-state reset)")
    if federation.get("simulate_attack") is not None:
        raise ConfigError("--simulate-attack is a testing switch of nfed federate, not of a Flower deployment")
    if districts and fed_config.min_clients > len(districts):
        raise ConfigError(f"--min-clients {fed_config.min_clients} exceeds the {len(districts)} district(s) of "
                          "--districts")
    if eval_deadline is None:
        eval_deadline = fed_config.deadline
    config = {"run-dir": str(Path(run_dir).expanduser().resolve()), "resume": bool(resume),
              "overwrite": bool(overwrite), "expected-nodes": int(expected_nodes),
              "connect-timeout": float(connect_timeout), "eval-deadline": float(eval_deadline or 0.0),
              "districts": ",".join(districts or ()),
              "track": TRACK_OFF if track is None else track or TRACK_BESIDE_RUN}
    for key, (field_name, kind) in FEDERATION_KEYS.items():
        value = federation[field_name]
        config[key] = kind(0 if value is None else value)
    train = train_config.to_dict()   # each node trains on its own device (node config `device`)
    train.pop("seed", None)    # one seed for the federation and the model: `seed` above
    config["train"] = train
    return config


def settings_from_run_config(run_config: Mapping[str, object]) -> FlowerRunSettings:
    """Parse the flat run configuration Flower hands the ServerApp (ConfigError naming a bad key)."""

    def get(key, kind, default=None):
        if key not in run_config:
            if default is None:
                raise ConfigError(f"Flower run config lacks '{key}' (write the app with `nfed flower-app`)")
            return default
        try:
            return kind(run_config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"Flower run config '{key}' = {run_config[key]!r} is not a {kind.__name__}") from None

    defaults = {field.name: field.default for field in dataclasses.fields(FederationConfig)}
    options = {field_name: get(key, kind, kind(defaults[field_name] or 0) if key in OPTIONAL_KEYS else None)
               for key, (field_name, kind) in FEDERATION_KEYS.items()}
    for name in UNSET_AS_ZERO:
        if options[name] <= 0:
            options[name] = None
    eval_deadline = check_number("eval-deadline", get("eval-deadline", float, options["deadline"] or 0.0),
                                 "flower_deadline")
    districts = str(get("districts", str, ""))
    train = {key[len(TRAIN_PREFIX):]: value for key, value in run_config.items() if key.startswith(TRAIN_PREFIX)}
    train["seed"] = options["seed"]
    unknown = set(train) - set(TrainConfig().to_dict())
    if unknown:
        raise ConfigError(f"Flower run config has unknown training key(s): {', '.join(sorted(unknown))}")
    return FlowerRunSettings(
        run_dir=Path(get("run-dir", str)).expanduser(),
        resume=bool(get("resume", bool, False)),
        overwrite=bool(get("overwrite", bool, False)),
        expected_nodes=check_number("expected-nodes", get("expected-nodes", int, 0), "expected_nodes"),
        connect_timeout=check_number("connect-timeout", get("connect-timeout", float, 300.0), "connect_timeout"),
        train_config=TrainConfig.from_dict(train),
        federation_config=FederationConfig(**options),
        eval_deadline=eval_deadline or None,
        districts=parse_allow_list(districts.split(","), "Flower run config 'districts'") if districts else None,
        track=_track(str(get("track", str, TRACK_OFF))),
    )


def _track(value: str) -> str | None:
    """The run config's `track` (optional: app folders written before it are not tracked) as --track's value."""
    return None if value == TRACK_OFF else "" if value == TRACK_BESIDE_RUN else value
