"""`nfed bench`: throughput benchmarks. Subcommands live in their own modules and load lazily."""
from __future__ import annotations

import click

from nfed.cli import LazyGroup

# subcommand -> (module, attribute); absent modules are not listed.
BENCHES: dict[str, tuple[str, str]] = {
    "conv": ("nfed.commands.bench_conv", "conv"),
    "step": ("nfed.commands.bench_step", "step"),
    "round": ("nfed.commands.bench_round", "round_"),
    "kernels": ("nfed.commands.bench_gpu", "kernels"),
    "aggregate": ("nfed.commands.bench_gpu", "aggregate"),
    "transfer": ("nfed.commands.bench_transfer", "transfer"),
}


@click.group(cls=LazyGroup, lazy_commands=BENCHES)
def bench():
    """Measure nfed's throughput and peak memory against a reference run in the same process."""
