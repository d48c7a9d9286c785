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
