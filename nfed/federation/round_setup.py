"""The set-up the server sends every client for one round, typed (RoundSetup), and its wire form.

Inside a process a set-up is a RoundSetup; it becomes a dict (`to_dict`) only where it crosses a process or the
network (worker task files, district_jobs' pool, Flower messages) and comes back through `from_dict`, which checks
every key and value, since it is read from the network. The wire form is the dict of earlier versions:
    {"round": 3, "local_epochs": 1, "config": TrainConfig.to_dict(), "epoch_seed_offset": 2,
     "keep_optimizer_state": False}
plus, only where used, "dp_clip" (DP-FedAvg: clip the update to this L2 norm), "prox_mu" (FedProx: the proximal
weight mu), "norm_policy" (fedbn / silobn: the BatchNorm tensors that stay with the district, left out of the
clipped update), "compress" (fp16 / int8 / int8-ef: the shared update leaves as a compressed delta,
nfed.federation.compression) and "simulate_attack" (a simulated label-flipping attacker trains on inverted masks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from nfed.common.errors import ConfigError
from nfed.common.validate import Limit, check_number
from nfed.federation.attacks import ATTACK_KEY
from nfed.federation.compression import COMPRESS_KEY, COMPRESS_MODES
from nfed.federation.norm_policy import NORM_POLICIES, NORM_POLICY_KEY
from nfed.training.trainer import TrainConfig

DP_CLIP_KEY = "dp_clip"
PROX_MU_KEY = "prox_mu"
ROUND = Limit(0, 10**9, integer=True)
SEED_OFFSET = Limit(0, 10**12, integer=True)
ATTACKED = ("label-flip",)   # the only simulated attack a client itself carries out
# wire key -> default: an optional key is absent from the wire when its value is the default
OPTIONAL = {PROX_MU_KEY: 0.0, NORM_POLICY_KEY: "shared", COMPRESS_KEY: "none", DP_CLIP_KEY: 0.0, ATTACK_KEY: None}


@dataclass(frozen=True, eq=True)
class RoundSetup(Mapping):
    """One round's set-up. Reading it by wire key (`setup["round"]`, `dict(setup)`) gives the wire form, so a
    train function written against the dict of earlier versions keeps working; nfed's own code reads fields."""

    round: int
    local_epochs: int
    config: TrainConfig
    epoch_seed_offset: int = 0
    keep_optimizer_state: bool = False
    dp_clip: float = 0.0
    prox_mu: float = 0.0
    norm_policy: str = "shared"
    compress: str = "none"
    simulate_attack: str | None = None

    def __post_init__(self):
        checked = {
            "round": ROUND.check("round", self.round),
            "local_epochs": check_number("local_epochs", self.local_epochs),
            "epoch_seed_offset": SEED_OFFSET.check("epoch_seed_offset", self.epoch_seed_offset),
            "dp_clip": check_number("dp_clip", self.dp_clip),
            "prox_mu": check_number("prox_mu", self.prox_mu),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if not isinstance(self.keep_optimizer_state, bool):
            raise ConfigError(f"keep_optimizer_state must be true or false, got {str(self.keep_optimizer_state)[:40]}")
        if not callable(getattr(self.config, "to_dict", None)):   # a TrainConfig (from_dict), or a stand-in
            raise ConfigError(f"a round set-up's config must be a TrainConfig, got {type(self.config).__name__}")
        _choice("norm policy", self.norm_policy, NORM_POLICIES)
        _choice("compression", self.compress, COMPRESS_MODES)
        if self.simulate_attack is not None:
            _choice("simulated attack", self.simulate_attack, ATTACKED)

    def to_dict(self) -> dict:
        """The wire form (JSON-able; the optional keys only where they differ from their default)."""
        values = {"round": self.round, "local_epochs": self.local_epochs, "config": self.config.to_dict(),
                  "epoch_seed_offset": self.epoch_seed_offset, "keep_optimizer_state": self.keep_optimizer_state}
        for key, default in OPTIONAL.items():
            value = getattr(self, key)
            if value != default:
                values[key] = value
        return values

    @classmethod
    def from_dict(cls, values) -> "RoundSetup":
        """A set-up from its wire form, every key and value checked (ConfigError in one line)."""
        if isinstance(values, RoundSetup):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(f"a round set-up must be a JSON object, got {type(values).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key)[:40] for key in values if key not in names)
        if unknown:
            raise ConfigError(f"round set-up has unknown key(s): {', '.join(unknown)}")
        missing = [name for name in ("round", "local_epochs", "config") if name not in values]
        if missing:
            raise ConfigError(f"round set-up lacks {', '.join(missing)}")
        config = values["config"]
        if not isinstance(config, Mapping):
            raise ConfigError(f"a round set-up's config must be a JSON object, got {type(config).__name__}")
        optional = {key: (default if values.get(key) is None else values[key]) for key, default in OPTIONAL.items()}
        return cls(values["round"], values["local_epochs"], TrainConfig.from_dict(dict(config)),
                   values.get("epoch_seed_offset", 0), values.get("keep_optimizer_state", False), **optional)

    def replace(self, **changes) -> "RoundSetup":
        return dataclasses.replace(self, **changes)

    # -- read-only Mapping of the wire form
    def __getitem__(self, key):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    __hash__ = None   # a TrainConfig is mutable


def _choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, got {str(value)[:40]!r}")


def make_round_setup(config: TrainConfig, round_number: int, local_epochs: int, *, keep_optimizer_state: bool = False,
                     prox_mu: float = 0.0, norm_policy: str = "shared", compress: str = "none",
                     dp_clip: float = 0.0) -> RoundSetup:
    """The set-up the server sends for round `round_number` (1-based); epochs continue the seed sequence."""
    if local_epochs < 1:
        raise ConfigError(f"local epochs must be >= 1, got {local_epochs}")
    return RoundSetup(int(round_number), int(local_epochs), config, int((round_number - 1) * local_epochs),
                      bool(keep_optimizer_state), float(dp_clip), float(prox_mu), norm_policy, compress)

