"""Options shared by the compute commands: --device and --precision, defined once."""
from __future__ import annotations

import os

import click

DEVICE_HELP = "cpu, cuda or cuda:N (default: $NFED_DEVICE, else cpu)"

device_option = click.option("--device", default=None, help=DEVICE_HELP)


def _apply_precision(ctx, param, value):
    """Set the process-wide GEMM precision; exported so worker processes inherit it."""
    from .. import precision

    mode = precision.parse_precision(value)
    precision.set_precision(mode)
    os.environ[precision.ENV_PRECISION] = mode
    return mode


precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default=None, callback=_apply_precision,
    help="GPU GEMM precision: fp32 (default, matches the CPU), tf32 (tensor cores) or bf16 (bf16 inputs, "
         "fp32 master weights and accumulation); default $NFED_PRECISION, else fp32. No effect on CPU.")


class LimitedNumber(click.ParamType):
    """A number option checked against nfed.validate.LIMITS: finite and in range, else one line and exit 1
    (`--lr inf: must be a finite number > 0 and <= 1`)."""

    def __init__(self, limit):
        self.limit = limit
        self.name = "integer" if limit.integer else "number"

    def convert(self, value, param, ctx):
        label = param.opts[0] if param is not None and param.opts else "value"
        if isinstance(value, str):
            return self.limit.parse(label, value)
        return self.limit.check(label, value)


def limited(key: str) -> LimitedNumber:
    """The click type of a numeric option whose accepted range is LIMITS[key]."""
    from ..validate import LIMITS

    return LimitedNumber(LIMITS[key])
