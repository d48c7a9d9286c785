"""`nfed bench conv`: parses the options and prints; the benchmark is nfed/benchmarks/conv.py."""
from __future__ import annotations

import json
import sys

import click

from nfed.commands.options import limited
from nfed.common.errors import ConfigError


@click.command("conv")
@click.option("--repeat", type=limited("repeat"), default=5, show_default=True,
              help="timed runs per measurement (best kept)")
@click.option("--no-memory", is_flag=True, help="skip the peak-memory subprocesses")
@click.option("--threads", type=limited("threads"), default=None,
              help="threads for both sides (default: all usable CPUs)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@click.option("--quiet", is_flag=True, help="no progress bar")
def conv(repeat, no_memory, threads, as_json, quiet):
    """conv2d 3x3/pad 1 float32 on (N,C,K,HW) = (8,16,16,64), (8,64,64,64), (8,32,32,128): nfed vs PyTorch."""
    from nfed.benchmarks.conv import format_table, progress_steps, run_conv_bench

    if repeat < 1:
        raise ConfigError(f"--repeat {repeat}: must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    if quiet:
        result = run_conv_bench(repeat=repeat, memory=not no_memory, threads=threads)
    else:
        with click.progressbar(length=progress_steps(repeat), label="bench conv", file=sys.stderr,
                               show_pos=True) as bar:
            result = run_conv_bench(repeat=repeat, memory=not no_memory, threads=threads,
                                    progress=lambda: bar.update(1))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
