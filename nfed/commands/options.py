"""Options shared by several commands, defined once: --device, --precision, checked numbers, the training set-up."""
from __future__ import annotations

import click

DEVICE_HELP = "cpu, cuda or cuda:N (default: $NFED_DEVICE, else cpu)"

device_option = click.option("--device", default=None, help=DEVICE_HELP)


def _apply_precision(ctx, param, value):
    """Set the process-wide GEMM precision (worker processes get it with their tasks: run_environment)."""
    from nfed.gpu import precision

    mode = precision.parse_precision(value)
    precision.set_precision(mode)
    return mode


def run_environment(device, precision):
    """The RunEnvironment of --device / --precision (the device checked usable here)."""
    from nfed.training.environment import RunEnvironment

    return RunEnvironment.from_options(device, precision)


def training_setup(device, precision, **options):
    """(TrainConfig, RunEnvironment) of the training options, --device and --precision; a model that cannot fit
    in this machine's memory is refused here, before any folder is made."""
    from nfed.training.trainer import require_memory

    config = training_config(**options)
    env = run_environment(device, precision)
    require_memory(config, env.device)
    return config, env


precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default=None, callback=_apply_precision,
    help="GPU GEMM precision: fp32 (default, matches the CPU), tf32 (tensor cores) or bf16 (bf16 inputs, "
         "fp32 master weights and accumulation); default $NFED_PRECISION, else fp32. No effect on CPU.")


class LimitedNumber(click.ParamType):
    """A number option checked against nfed.common.validate.LIMITS: finite and in range, else one line and exit 1
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
    from nfed.common.validate import LIMITS

    return LimitedNumber(LIMITS[key])


def apply_options(options):
    """Decorator applying a list of click options in the order they are listed (first = first in --help)."""
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


# The training set-up of every command that trains W-Net-CD (train-local, train-central, personalise):
# a profile and overrides of its values; `training_config` turns them into a TrainConfig.
TRAINING_OPTIONS = [
    click.option("--profile", type=click.Choice(["demo", "paper"]), default="demo", show_default=True,
                 help="demo: small and fast on CPU; paper: the study's set-up (w 64, lr 1e-4, 50 epochs)"),
    click.option("--epochs", type=limited("epochs"), help="maximum epochs (profile's value by default)"),
    click.option("--patience", type=limited("patience"), help="early-stopping patience in epochs"),
    click.option("--patience-steps", type=limited("patience_steps"),
                 help="early stopping also waits this many optimiser steps without improvement (demo: 20)"),
    click.option("--batch-size", type=limited("batch_size")),
    click.option("--lr", type=limited("lr"), help="Adam learning rate"),
    click.option("--width", type=limited("width"), help="W-Net base width w"),
    click.option("--classes", type=click.Choice(["2", "5"]), help="2 (default) or 5 (change types)"),
    click.option("--lambda-rec", type=limited("lambda_rec"),
                 help="weight of the U-Decoder's reconstruction loss (0 skips it)"),
    click.option("--seed", type=limited("seed"),
                 help="seed of initialisation, shuffling and augmentation (default 0)"),
    click.option("--no-augment", is_flag=True, help="train without flips/rotations"),
]


def training_config(profile, *, epochs=None, patience=None, patience_steps=None, batch_size=None, lr=None,
                    width=None, classes=None, lambda_rec=None, seed=None, no_augment=False, **_ignored):
    """The TrainConfig of TRAINING_OPTIONS' values (None keeps the profile's value)."""
    from nfed.training.trainer import profile_config

    return profile_config(profile, epochs=epochs, patience=patience, patience_steps=patience_steps,
                          batch_size=batch_size, lr=lr, width=width,
                          classes=int(classes) if classes else None, lambda_rec=lambda_rec, seed=seed,
                          augment=False if no_augment else None)
