"""`nfed bench transfer`: parses the options and prints; the benchmark is nfed/benchmarks/transfer.py.

nfed's serialisation of W-Net-CD's weights (now and the packing it replaced) and a plain HTTP copy of the same
bytes on 127.0.0.1; bench/bench_flower_transfer.py adds the same round trip through a Flower deployment.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from nfed.commands.options import limited


@click.command("transfer")
@click.option("--width", type=limited("width"), default=8, show_default=True,
              help="W-Net base width w (64: the study's 67.3 M values, 269 MB)")
@click.option("--repeat", type=limited("repeat"), default=3, show_default=True, help="timed repeats (the best is kept)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the JSON to this file (atomically)")
def transfer(width, repeat, as_json, out):
    """MB/s of nfed's weights serialisation and of a plain HTTP round trip of the same bytes on loopback."""
    from nfed.common.errors import ConfigError

    try:
        from nfed.benchmarks.transfer import run_transfer_bench, summary_line
        import flwr  # noqa: F401 - the packing is Flower's Array
    except ImportError:
        raise ConfigError("nfed bench transfer needs flwr: pip install 'nfed[flower]'") from None
    result = run_transfer_bench(width, repeat)
    if out is not None:
        from nfed.common.atomic import write_json_atomic

        write_json_atomic(out, result)
    click.echo(json.dumps(result, indent=2) if as_json else summary_line(result))
