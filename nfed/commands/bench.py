"""`nfed bench`: throughput benchmarks. Subcommands live in their own modules and load lazily."""
from __future__ import annotations

import importlib
import importlib.util

import click

# subcommand -> (module, attribute); absent modules are not listed.
BENCHES: dict[str, tuple[str, str]] = {
    "conv": ("nfed.commands.bench_conv", "conv"),
    "step": ("nfed.commands.bench_step", "step"),
    "kernels": ("nfed.commands.bench_gpu", "kernels"),
    "aggregate": ("nfed.commands.bench_gpu", "aggregate"),
}


class _LazyBenchGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, (m, _) in BENCHES.items() if importlib.util.find_spec(m) is not None)

    def get_command(self, ctx, name):
        entry = BENCHES.get(name)
        if entry is None or importlib.util.find_spec(entry[0]) is None:
            return None
        return getattr(importlib.import_module(entry[0]), entry[1])


@click.group(cls=_LazyBenchGroup)
def bench():
    """Measure nfed's throughput and peak memory against a reference run in the same process."""
