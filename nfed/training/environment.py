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

from nfed.common.backend import CPU, Device, parse_device
from nfed.common.fields import from_fields
from nfed.core.functions.parallel import num_workers
from nfed.gpu.precision import get_precision, parse_precision, precision, set_precision


@dataclass(frozen=True)
class RunEnvironment:
    """`device`: the Device it computes on (a string is parsed and checked usable here, once: everything after
    passes the value); `precision`: the GPU GEMM precision (fp32, tf32, bf16; no effect on CPU)."""

    device: Device = CPU
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", parse_device(self.device))
        object.__setattr__(self, "precision", parse_precision(self.precision))

    @classmethod
    def from_options(cls, device: str | None = None, precision: str | None = None) -> "RunEnvironment":
        """The environment of --device / --precision: None takes $NFED_DEVICE (else cpu) and the precision in
        force (--precision's, else $NFED_PRECISION, else fp32); the device must be usable here (DeviceError)."""
        return cls(parse_device(device), precision or get_precision())

    @classmethod
    def from_dict(cls, values: Mapping) -> "RunEnvironment":
        """An environment from its to_dict() (ConfigError naming unknown keys)."""
        return from_fields(cls, values, "run environment")

    def to_dict(self) -> dict:
        """Plain values, for a worker task or a run's record (from_dict parses the device again where it runs)."""
        return {"device": str(self.device), "precision": self.precision}

    def record(self) -> dict:
        """What a run's outputs say about where it computed: this environment and the CPU threads nfed's ops
        used in this process (set by $NFED_NUM_THREADS and the worker pools, else every usable CPU)."""
        return {**self.to_dict(), "cpu_threads": num_workers()}

    def on_gpu(self, index: int) -> "RunEnvironment":
        """The same environment on GPU `index` (a client of --gpus), checked usable here."""
        return dataclasses.replace(self, device=parse_device(f"cuda:{int(index)}"))

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
    return RunEnvironment(CPU, get_precision())
