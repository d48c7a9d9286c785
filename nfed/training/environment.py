"""Where a run computes (RunEnvironment: device and GEMM precision), kept apart from what it trains (TrainConfig).

A TrainConfig is what the federation server sends to every client; the environment is each machine's own: a
client trains the same set-up on its own device. The environment is passed explicitly to training and
evaluation, travels with worker tasks, and is recorded in every run's outputs (checkpoints, summary.json), so a
result says on what and at which precision it was computed.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Mapping

from nfed.common import backend
from nfed.common.fields import from_fields
from nfed.core.functions.parallel import num_workers
from nfed.gpu.precision import get_precision, parse_precision, precision, set_precision


@dataclass(frozen=True)
class RunEnvironment:
    """`device`: cpu, cuda or cuda:N; `precision`: the GPU GEMM precision (fp32, tf32, bf16; no effect on CPU)."""

    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", str(self.device))
        object.__setattr__(self, "precision", parse_precision(self.precision))

    @classmethod
    def from_options(cls, device: str | None = None, precision: str | None = None) -> "RunEnvironment":
        """The environment of --device / --precision: None takes $NFED_DEVICE (else cpu) and the precision in
        force (--precision's, else $NFED_PRECISION, else fp32); the device must be usable here (DeviceError)."""
        return cls(str(backend.parse_device(device)), precision or get_precision())

    @classmethod
    def from_dict(cls, values: Mapping) -> "RunEnvironment":
        """An environment from its to_dict() (ConfigError naming unknown keys)."""
        return from_fields(cls, values, "run environment")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record(self) -> dict:
        """What a run's outputs say about where it computed: this environment and the CPU threads nfed's ops
        used in this process (set by $NFED_NUM_THREADS and the worker pools, else every usable CPU)."""
        return {**self.to_dict(), "cpu_threads": num_workers()}

    def on(self, device: str | None) -> "RunEnvironment":
        """The same environment on another device (None: this one's)."""
        return self if device is None else dataclasses.replace(self, device=str(device))

    def apply(self) -> None:
        """Make this environment's precision the process's (the GEMMs read it process-wide)."""
        set_precision(self.precision)

    @contextlib.contextmanager
    def active(self):
        """Run a block at this environment's precision (the process's is restored after it)."""
        with precision(self.precision):
            yield self


def default_environment() -> RunEnvironment:
    """What a call without an environment runs on: the CPU, at the precision in force."""
    return RunEnvironment("cpu", get_precision())
