"""The federation's options (FederationConfig: what shapes the protocol), their checks, and client speeds."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from nfed.common import strict_json
from nfed.common.errors import ConfigError
from nfed.common.validate import check_fields, check_number

log = logging.getLogger(__name__)

SPEED_PROFILES = ("uniform", "study")


@dataclass
class FederationConfig:
    """Options of `nfed federate` that shape the protocol (the model/optimiser set-up is a TrainConfig)."""

    rounds: int = 20
    local_epochs: int = 1
    eps: float = 0.0
    patience_rounds: int = 0
    warmup_rounds: int = 0      # rounds in which no stop rule fires nor counts (see stop_rules.StopRules)
    delta: float = 0.0
    deadline: float | None = None
    fraction: float = 1.0
    min_clients: int = 1
    workers: int = 0
    server_opt: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float = 0.9
    client_state: str = "reset"
    client_speeds: dict[str, float] | None = None
    seed: int = 0
    gpus: tuple[int, ...] = ()
    evaluate_rounds: bool = True
    prox_mu: float = 0.0        # FedProx: clients add mu/2 ||w - w_global||^2 to their loss (0: plain FedAvg)
    norm_policy: str = "shared"  # shared | fedbn | silobn: which BatchNorm tensors stay with each district
    # defences (nfed.federation.robust, nfed.federation.privacy, Flower's SecAgg+) and the testing-only attack
    # simulation
    aggregator: str = "fedavg"
    trim_beta: float = 0.2
    krum_f: int = 1
    krum_m: int = 0
    clip_factor: float = 1.0
    max_sample_share: float = 1.0
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float | None = None
    secure_aggregation: bool = False
    secagg_range: float = 8.0
    simulate_attack: str | None = None
    attackers: int = 0

    def __post_init__(self):
        check_fields(self, ("rounds", "local_epochs", "eps", "patience_rounds", "warmup_rounds", "delta", "deadline",
                            "fraction", "min_clients", "workers", "server_lr", "server_momentum", "seed", "trim_beta",
                            "krum_f", "krum_m", "clip_factor", "max_sample_share", "dp_clip", "dp_noise",
                            "dp_delta", "secagg_range", "attackers", "prox_mu"),
                     optional=("deadline", "server_lr", "dp_delta"))
        check_defences(self)
        check_norm_policy(self)
        if self.client_state not in ("reset", "keep"):
            raise ConfigError(f"--client-state must be reset or keep, got {self.client_state}")
        self.gpus = tuple(check_number("gpu", g) for g in self.gpus)
        if self.client_speeds is not None:
            self.client_speeds = {str(k): check_number(f"speed of {k}", v, "client_speed")
                                  for k, v in self.client_speeds.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def check_defences(config: FederationConfig) -> None:
    """Options that exclude each other fail in one line (ConfigError)."""
    from nfed.federation.attacks import ATTACKS
    from nfed.federation.robust import AGGREGATORS

    if config.aggregator not in AGGREGATORS:
        raise ConfigError(f"--aggregator must be one of {', '.join(AGGREGATORS)}, got {config.aggregator}")
    if config.simulate_attack is not None and config.simulate_attack not in ATTACKS:
        raise ConfigError(f"--simulate-attack must be one of {', '.join(ATTACKS)}, got {config.simulate_attack}")
    if (config.simulate_attack is None) != (config.attackers == 0):
        raise ConfigError("--simulate-attack KIND and --attackers N (> 0) go together")
    if config.dp_noise > 0 and config.dp_clip == 0:
        raise ConfigError("--dp-noise needs --dp-clip (the L2 bound each client clips its update to)")
    if config.dp_clip > 0 and config.aggregator != "fedavg":
        raise ConfigError(f"--dp-clip runs DP-FedAvg; it cannot be combined with --aggregator {config.aggregator}")
    if config.secure_aggregation:
        if config.aggregator != "fedavg":
            raise ConfigError(f"secure aggregation hides the individual updates that --aggregator "
                              f"{config.aggregator} needs: use fedavg (clipping moves to the clients: --dp-clip)")
        if config.max_sample_share < 1.0:
            raise ConfigError("with secure aggregation the server never sees one client's weight: "
                              "--max-sample-share cannot apply")
        if config.simulate_attack is not None:
            raise ConfigError("--simulate-attack changes individual updates on the server, which secure "
                              "aggregation hides")


def check_norm_policy(config: FederationConfig) -> None:
    """One of NORM_POLICIES; secure aggregation sums whole models, so it runs with `shared` only."""
    from nfed.federation.norm_policy import NORM_POLICIES

    if config.norm_policy not in NORM_POLICIES:
        raise ConfigError(f"--norm-policy must be one of {', '.join(NORM_POLICIES)}, got {config.norm_policy}")
    if config.norm_policy != "shared" and config.secure_aggregation:
        raise ConfigError(f"--norm-policy {config.norm_policy} keeps BatchNorm tensors per district, which secure "
                          "aggregation (a sum of whole models) cannot leave out yet: use --norm-policy shared")


# ------------------------------------------------------------------------------------------ client speeds

def load_client_speeds(spec: str | None, districts: Sequence[str]) -> dict[str, float] | None:
    """Relative client speeds from a named profile (`uniform`, `study`) or a JSON / CSV file district -> speed.

    `study` puts the districts, in table order, into three tiers of hardware (1.0, 0.5, 0.25), like the
    study's mix of faster and slower district machines. Districts missing from a file run at speed 1.
    """
    if spec is None or spec == "":
        return None
    if spec == "uniform":
        return {name: 1.0 for name in districts}
    if spec == "study":
        tiers = (1.0, 0.5, 0.25)
        return {name: tiers[i % 3] for i, name in enumerate(districts)}
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--client-speeds: '{spec}' is neither a profile ({', '.join(SPEED_PROFILES)}) "
                          f"nor an existing JSON/CSV file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = strict_json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("expected an object district -> speed")
            pairs = raw.items()
        else:
            rows = [row for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
            if rows and rows[0][0].strip().lower() == "district":
                rows = rows[1:]
            pairs = [(row[0].strip(), row[1]) for row in rows]
        speeds = {str(name): float(value) for name, value in pairs}
    except (ValueError, IndexError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read client speeds ({exc})") from None
    speeds = {name: check_number(f"{path}: speed of {name}", value, "client_speed") for name, value in speeds.items()}
    unknown = sorted(set(speeds) - set(districts))
    if unknown:
        log.warning("%s: speeds for unknown district(s) ignored: %s", path, ", ".join(unknown))
    return {name: speeds.get(name, 1.0) for name in districts}
