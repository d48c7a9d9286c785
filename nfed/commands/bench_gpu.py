"""`nfed bench kernels` and `nfed bench aggregate`: their options and the tables they print.

kernels: conv/deconv throughput of every distinct W-Net-CD layer shape, nfed vs cuDNN through PyTorch
(engine: nfed.benchmarks.gpu_kernels). aggregate: FedAvg bandwidth against the device's copy bandwidth
(engine: nfed.benchmarks.gpu_aggregate). Both run on every visible GPU for `--device cuda` (or `all`),
print a table and write JSON (--out).
"""
from __future__ import annotations

import json

import click

from nfed.benchmarks.gpu import bench_devices
from nfed.benchmarks.gpu_aggregate import run_aggregate_bench
from nfed.benchmarks.gpu_kernels import run_kernels_bench
from nfed.commands.options import limited
from nfed.common.atomic import write_json_atomic
from nfed.common.errors import ConfigError
from nfed.gpu import precision as precision_modes


def _emit(result: dict, as_json: bool, out: str | None, table) -> None:
    if out:
        write_json_atomic(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        table(result)


def _kernels_table(result: dict) -> None:
    cfg = result["config"]
    for dev in result["devices"]:
        click.echo(f"{dev['device']} {dev['device_name']}  precision {dev['precision']}  "
                   f"w={cfg['width']} tile={cfg['tile']} batch={cfg['batch']}  reference: "
                   f"{dev['reference'] or dev['reference_note']}")
        click.echo(f"{'layer':<30}{'n':>4}{'nfed fwd':>10}{'bwd':>8}{'ref fwd':>10}{'bwd':>8}"
                   f"{'ratio':>8}{'peak MB':>9}{'ref MB':>8}")
        for r in dev["layers"]:
            name = f"{r['kind']} {r['c_in']}->{r['c_out']} {r['kernel']}x{r['kernel']}/{r['stride']} @{r['h']}x{r['w']}"
            name += {"direct": " D", "winograd": " W"}.get(r.get("nfed_forward_path"), "")
            ref = (f"{r['reference_forward_tflops']:>10.3g}{r['reference_backward_tflops']:>8.3g}{r['ratio']:>8.2f}"
                   if "ratio" in r else f"{'-':>10}{'-':>8}{'-':>8}")
            mem = lambda v: f"{v / 2**20:.0f}" if v is not None else "-"  # noqa: E731
            click.echo(f"{name:<30}{r['n']:>4}{r['nfed_forward_tflops']:>10.3g}{r['nfed_backward_tflops']:>8.3g}"
                       f"{ref}{mem(r['nfed_peak_bytes']):>9}{mem(r.get('reference_peak_bytes')):>8}")
        if dev["geomean_ratio"] is not None:
            click.echo(f"geometric mean ratio (reference time / nfed time): fwd+bwd {dev['geomean_ratio']:.2f}, "
                       f"fwd {dev['geomean_ratio_forward']:.2f}, bwd {dev['geomean_ratio_backward']:.2f}")
        click.echo("TFLOP/s; backward = input + weight + bias gradients (2x the forward FLOPs); "
                   "D = direct forward, W = Winograd forward and gradients; their im2col+GEMM times are "
                   "in the JSON")


def _common_options(fn):
    fn = click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the JSON result here")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")(fn)
    fn = click.option("--warmup", type=limited("warmup"), default=2, show_default=True, help="untimed runs first")(fn)
    fn = click.option("--repeat", type=limited("repeat"), default=5, show_default=True, help="timed runs (median)")(fn)
    fn = click.option("--device", default=None,
                      help="cpu, cuda:N, or cuda/all for every visible GPU (default $NFED_DEVICE, else cpu)")(fn)
    return fn


@click.command("kernels")
@_common_options
@click.option("--precision", default=None, help="fp32 | tf32 | bf16 GEMMs (default $NFED_PRECISION, else fp32)")
@click.option("--width", type=limited("width"), default=None, help="W-Net base width (default 64 on GPU, 4 on CPU)")
@click.option("--tile", type=limited("tile"), default=None,
              help="tile size, multiple of 16 (default 256 on GPU, 32 on CPU)")
@click.option("--batch", type=limited("batch_size"), default=None,
              help="image pairs per step (default 8 on GPU, 2 on CPU)")
@click.option("--no-reference", is_flag=True, help="time nfed only (no PyTorch)")
def kernels(device, repeat, warmup, as_json, out, precision, width, tile, batch, no_reference):
    """Conv/deconv throughput of every distinct W-Net-CD layer shape, nfed vs cuDNN (PyTorch)."""
    precision = precision_modes.parse_precision(precision)
    devices = bench_devices(device)
    gpu = devices[0].is_gpu
    width = width or (64 if gpu else 4)
    tile = tile or (256 if gpu else 32)
    batch = batch or (8 if gpu else 2)
    if min(width, batch, repeat) < 1 or warmup < 0:
        raise ConfigError("--width, --batch and --repeat must be >= 1 and --warmup >= 0")
    result = {"bench": "kernels", "config": {"width": width, "tile": tile, "batch": batch, "repeat": repeat,
                                             "warmup": warmup, "precision": precision},
              "devices": [run_kernels_bench(d, precision, width, tile, batch, repeat, warmup, not no_reference)
                          for d in devices]}
    _emit(result, as_json, out, _kernels_table)


def _aggregate_table(result: dict) -> None:
    for r in result["devices"]:
        click.echo(f"{r['device']} {r['device_name']}: FedAvg of {r['models']} models x {r['parameters']:,} "
                   f"parameters ({r['bytes_moved'] / 1e9:.2f} GB moved)")
        click.echo(f"  copy bandwidth          {r['copy_gb_s']:10.1f} GB/s")
        label = "nfed FedAvg (f64 sum)" if r["device"] != "cpu" else "numpy weighted sum"
        click.echo(f"  {label:<23}{r['nfed_kernel_gb_s']:10.1f} GB/s  {r['nfed_kernel_s'] * 1e3:8.2f} ms  "
                   f"({100 * r['nfed_kernel_fraction_of_copy']:.0f}% of copy)")
        click.echo(f"  nfed aggregator.fedavg  {r['aggregator_gb_s']:10.1f} GB/s  {r['aggregator_s'] * 1e3:8.2f} ms")
        if "reference_gb_s" in r:
            click.echo(f"  {'pytorch weighted sum':<23}{r['reference_gb_s']:10.1f} GB/s  "
                       f"{r['reference_s'] * 1e3:8.2f} ms  "
                       f"(reference time / nfed time {r['ratio']:.2f})")


@click.command("aggregate")
@_common_options
@click.option("--models", type=limited("models"), default=25, show_default=True, help="models averaged (districts)")
@click.option("--parameters", type=limited("parameters"), default=None,
              help="parameters per model (default 67.3e6 on GPU, 4e6 on CPU)")
@click.option("--no-reference", is_flag=True, help="time nfed only (no PyTorch)")
def aggregate(device, repeat, warmup, as_json, out, models, parameters, no_reference):
    """FedAvg bandwidth: K models of P parameters, against the device's copy bandwidth in the same run."""
    devices = bench_devices(device)
    parameters = int(parameters or (67.3e6 if devices[0].is_gpu else 4e6))
    if models < 1 or parameters < 1 or repeat < 1 or warmup < 0:
        raise ConfigError("--models, --parameters and --repeat must be >= 1 and --warmup >= 0")
    result = {"bench": "aggregate", "config": {"models": models, "parameters": parameters, "repeat": repeat,
                                               "warmup": warmup},
              "devices": [run_aggregate_bench(d, models, parameters, repeat, warmup, not no_reference)
                          for d in devices]}
    _emit(result, as_json, out, _aggregate_table)


__all__ = ["kernels", "aggregate"]
