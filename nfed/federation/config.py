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
from nfed.common.fields import check_declared, declared, option
from nfed.common.names import check_name
from nfed.common.validate import SECONDS_MAX, SEED, Limit, check_number
from nfed.federation.selection import MAX_WINDOW, RULES

log = logging.getLogger(__name__)

SPEED_PROFILES = ("uniform", "study")


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); empty -> ()."""
    if not text:
        return ()
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--gpus '{text}': expected comma-separated GPU ids such as 0,1,2") from None
    return tuple(check_number("--gpus", g, "gpu") for g in gpus)


@declared
@dataclass
class FederationConfig:
    """Options of `nfed federate` that shape the protocol (the model/optimiser set-up is a TrainConfig).

    Each field is declared once (nfed.common.fields.option): its command-line option, range and Flower run-config
    key are generated from it. A Flower key added after the first Flower version must be optional_in_flower."""

    rounds: int = option(200, cli="--rounds", limit=Limit(1, 100000, integer=True), flower_key="rounds",
                         help="round budget (a safety net: the validation-loss rule should end the run first)")
    local_epochs: int = option(3, cli="--local-epochs", limit=Limit(1, 10000, integer=True),
                               help="epochs per client per round", flower_key="local-epochs")
    eps: float = option(1e-3, cli="--eps", limit=Limit(0, 1), flower_key="eps",
                        help="stop when ||w_r+1 - w_r|| / ||w_r|| < eps (0 disables)")
    patience_rounds: int = option(10, cli="--patience-rounds", limit=Limit(0, 100000, integer=True),
                                  flower_key="patience-rounds",
                                  help="stop when the validation loss has not improved by --delta for this many "
                                       "rounds (0 disables)")
    warmup_rounds: int = option(10, cli="--warmup-rounds", limit=Limit(0, 100000, integer=True),
                                flower_key="warmup-rounds", optional_in_flower=True,
                                help="no stop rule fires (or counts a stale round) and no round is kept in these "
                                     "first rounds")
    delta: float = option(0.0, cli="--delta", limit=Limit(0, 1e9), flower_key="delta",
                          help="minimum validation-loss improvement")
    select_by: str = option("f1", cli="--select-by", choices=RULES, flower_key="select-by",
                            optional_in_flower=True,
                            help="which round's global model is kept and scored (RUN/best.h5): lowest mean "
                                 "validation loss, highest mean validation F1, or either averaged over "
                                 "--select-window rounds (loss-ma, f1-ma)")
    select_window: int = option(3, cli="--select-window", limit=Limit(1, MAX_WINDOW, integer=True),
                                flower_key="select-window", optional_in_flower=True,
                                help="rounds in the moving average of --select-by loss-ma / f1-ma")
    deadline: float | None = option(None, cli="--deadline", limit=Limit(0, SECONDS_MAX, low_open=True),
                                    flower_key="deadline",   # 0 in a Flower run config: wait for every client
                                    help="seconds a round waits for its clients; later ones are left out of the "
                                         "round")
    fraction: float = option(1.0, cli="--fraction", limit=Limit(0, 1, low_open=True), flower_key="fraction",
                             help="share of the districts sampled per round (seeded)")
    min_clients: int = option(1, cli="--min-clients", limit=Limit(1, 100000, integer=True), flower_key="min-clients",
                              help="a round with fewer responders keeps the previous global weights")
    workers: int = option(0, cli="--workers", limit=Limit(0, 1024, integer=True),
                          help="run clients in N parallel worker processes with a real deadline (0/1: in turn, in "
                               "process)")
    server_opt: str = option("fedavg", cli="--server-opt", choices=("fedavg", "fedavgm", "fedadam"),
                             flower_key="server-opt",
                             help="server optimiser (FedAvgM: server momentum; FedAdam: Adam on the server)")
    server_lr: float | None = option(None, cli="--server-lr", limit=Limit(0, 10, low_open=True),
                                     flower_key="server-lr",   # 0 in a Flower run config: the usual default
                                     help="server learning rate (fedavg/fedavgm 1, fedadam 0.01)")
    server_momentum: float = option(0.9, cli="--server-momentum", limit=Limit(0, 1, high_open=True),
                                    flower_key="server-momentum", help="FedAvgM momentum")
    client_state: str = option("reset", cli="--client-state", choices=("reset", "keep"),
                               help="keep: each client keeps its Adam state between rounds (stored in "
                                    "RUN/client_state)")
    # district -> relative speed: federate's --client-speeds names a profile or file, read once the packs are known
    client_speeds: dict[str, float] | None = option(None)
    seed: int = option(0, cli="--seed", limit=SEED, flower_key="seed",
                       help="seed of the model's initialisation, the clients' sampling and shuffling")
    gpus: tuple[int, ...] = option((), cli="--gpus", parse=parse_gpus,
                                   help="spread worker clients over these GPUs round-robin, e.g. 0,1,2")
    evaluate_rounds: bool = option(True, cli="--no-round-eval", flower_key="evaluate-rounds",
                                   help="skip evaluating the global model on every validation split after each "
                                        "round")
    prox_mu: float = option(0.0, cli="--prox-mu", limit=Limit(0, 1000), flower_key="prox-mu",
                            optional_in_flower=True,
                            help="FedProx: each client adds mu/2 ||w - w_global||^2 over the trainable weights to "
                                 "its loss (0: plain FedAvg)")
    norm_policy: str = option("shared", cli="--norm-policy", choices=("shared", "fedbn", "silobn"),
                              flower_key="norm-policy", optional_in_flower=True,
                              help="which BatchNorm tensors stay with each district: none (shared), all (fedbn) "
                                   "or the running statistics (silobn)")
    hold_out: tuple[str, ...] = option((), cli="--hold-out", multiple=True,
                                       help="district kept out of training (never selected or averaged, not in the "
                                            "stop rules' validation mean) but scored, before and after AdaBN on its "
                                            "own training tiles (RUN/heldout.csv); repeatable")
    compress: str = option("none", cli="--compress", choices=("none", "fp16", "int8", "int8-ef"),
                           flower_key="compress", optional_in_flower=True,
                           help="how clients send their update: weights (none), or the difference to the global model "
                                "in float16, int8 with a scale per block, or int8 with error feedback (int8-ef: the "
                                "rounding left out is sent later; kept in RUN/client_state)")
    broadcast: str = option("fp32", cli="--broadcast", choices=("fp32", "fp16"), flower_key="broadcast",
                            optional_in_flower=True,
                            help="how the server sends the global model: float32, or float16 (BatchNorm statistics "
                                 "and small tensors stay float32; the server keeps its float32 model)")
    # defences (nfed.federation.robust, nfed.federation.privacy, Flower's SecAgg+) and the testing-only attack
    # simulation
    aggregator: str = option("fedavg", cli="--aggregator",
                             choices=("fedavg", "median", "trimmed-mean", "multi-krum", "clipped"),
                             flower_key="aggregator", optional_in_flower=True,
                             help="how updates are combined: FedAvg (streams), or robust to hostile clients (hold "
                                  "every update)")
    trim_beta: float = option(0.2, cli="--trim-beta", limit=Limit(0, 0.5, high_open=True), flower_key="trim-beta",
                              optional_in_flower=True,
                              help="trimmed-mean: share of values dropped at each end, per coordinate")
    krum_f: int = option(1, cli="--krum-f", limit=Limit(0, 100000, integer=True), flower_key="krum-f",
                         optional_in_flower=True, help="multi-krum: hostile clients tolerated")
    krum_m: int = option(0, cli="--krum-m", limit=Limit(0, 100000, integer=True), flower_key="krum-m",
                         optional_in_flower=True, help="multi-krum: updates averaged (0: n - f)")
    clip_factor: float = option(1.0, cli="--clip-factor", limit=Limit(0, 1e6, low_open=True),
                                flower_key="clip-factor", optional_in_flower=True,
                                help="clipped: delta norms clipped to this multiple of the round's median delta norm")
    max_sample_share: float = option(1.0, cli="--max-sample-share", limit=Limit(0, 1, low_open=True),
                                     flower_key="max-sample-share", optional_in_flower=True,
                                     help="no client weighs more than this share of a round (1: no share cap). A "
                                          "claim above the count its pack announced when it joined, or its "
                                          "registered count, is always capped")
    dp_clip: float = option(0.0, cli="--dp-clip", limit=Limit(0, 1e6), flower_key="dp-clip", optional_in_flower=True,
                            help="DP-FedAvg: each client clips its update to this L2 norm (0: no differential "
                                 "privacy)")
    dp_noise: float = option(0.0, cli="--dp-noise", limit=Limit(0, 1e6), flower_key="dp-noise",
                             optional_in_flower=True,
                             help="DP-FedAvg: Gaussian noise multiplier z (noise std z * dp-clip on the sum)")
    dp_delta: float | None = option(None, cli="--dp-delta", limit=Limit(0, 1, low_open=True, high_open=True),
                                    flower_key="dp-delta", optional_in_flower=True,   # 0 in a Flower run config: 1 / n
                                    help="delta of the privacy accounting (default: 1 / the districts' training "
                                         "samples)")
    secure_aggregation: bool = option(False, cli="--secure-aggregation", flower_key="secure-aggregation",
                                      optional_in_flower=True,
                                      help="Flower's SecAgg+: the ServerApp learns only the sum of the updates (needs "
                                           "--aggregator fedavg)")
    secagg_range: float = option(8.0, cli="--secagg-range", limit=Limit(0, 1e6, low_open=True),
                                 flower_key="secagg-range", optional_in_flower=True,
                                 help="secure aggregation: each update coordinate is clipped to +-this before "
                                      "quantisation (--dp-clip, when set, is used instead)")
    simulate_attack: str | None = option(None, cli="--simulate-attack",
                                         choices=("sign-flip", "noise", "scaled", "label-flip", "sample-inflation"),
                                         help="TESTING ONLY: --attackers seeded districts send hostile updates of "
                                              "this kind")
    attackers: int = option(0, cli="--attackers", limit=Limit(0, 100000, integer=True),
                            help="TESTING ONLY: number of simulated attackers")

    def __post_init__(self):
        check_declared(self)
        check_defences(self)
        check_norm_policy(self)
        self.hold_out = tuple(check_name(name, "--hold-out", error=ConfigError) for name in self.hold_out)
        if len(set(self.hold_out)) != len(self.hold_out):
            raise ConfigError(f"--hold-out names a district twice: {', '.join(self.hold_out)}")
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
        if config.compress != "none" or config.broadcast != "fp32":
            raise ConfigError("secure aggregation quantises each update itself and sends the global model in "
                              "float32: use --compress none --broadcast fp32 (DP-FedAvg combines with both)")


def check_norm_policy(config: FederationConfig) -> None:
    """One of NORM_POLICIES (secure aggregation then sums the shared tensors alone: nfed.federation.flower.secagg)."""
    from nfed.federation.norm_policy import NORM_POLICIES

    if config.norm_policy not in NORM_POLICIES:
        raise ConfigError(f"--norm-policy must be one of {', '.join(NORM_POLICIES)}, got {config.norm_policy}")


def training_districts(districts: Sequence[str], hold_out: Sequence[str]) -> list[str]:
    """The districts that train: all but the held-out ones, each of which must be one of `districts`
    (ConfigError), with at least one left to train."""
    unknown = [name for name in hold_out if name not in districts]
    if unknown:
        raise ConfigError(f"--hold-out {', '.join(unknown)}: no such district among the {len(districts)} packs")
    training = [name for name in districts if name not in hold_out]
    if not training:
        raise ConfigError("--hold-out holds out every district: at least one must train")
    return training


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
