"""`nfed bench step`: parses the options and prints; the benchmark is nfed/benchmarks/step.py."""
from __future__ import annotations

import json

import click

from nfed.commands.options import device_option, limited, precision_option


@click.command("step")
@device_option
@precision_option
@click.option("--width", type=limited("width"), default=8, show_default=True, help="W-Net base width w")
@click.option("--tile", type=limited("tile"), default=64, show_default=True, help="tile size (multiple of 16)")
@click.option("--batch", type=limited("batch_size"), default=8, show_default=True, help="image pairs per step")
@click.option("--lambda-rec", type=limited("lambda_rec"), default=0.1, show_default=True, help="reconstruction weight")
@click.option("--repeat", type=limited("repeat"), default=5, show_default=True, help="timed steps (after --warmup)")
@click.option("--warmup", type=limited("warmup"), default=2, show_default=True, help="untimed steps first")
@click.option("--eval", "inference", is_flag=True, help="time the inference forward (eval mode, no graph) instead")
@click.option("--threads", type=limited("threads"), default=None,
              help="CPU threads for both sides (NFED_NUM_THREADS / torch.set_num_threads; default: all usable CPUs)")
@click.option("--no-reference", is_flag=True, help="time nfed only")
@click.option("--cprofile", "cprofile_top", type=limited("cprofile_top"), default=0,
              help="also profile nfed's timed steps and print the top N functions (by total time) to stderr")
@click.option("--op-profile", is_flag=True,
              help="also report where nfed's step goes: time per op and phase, the optimiser, the rest (CPU)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def step(device, precision, width, tile, batch, lambda_rec, repeat, warmup, inference, threads, no_reference,
         cprofile_top, op_profile, as_json):
    """Training-step (or --eval inference) throughput of nfed vs the same model in PyTorch, in the same run."""
    from nfed.benchmarks.step import report_lines, run_step_bench, step_task

    task = step_task(device=device, precision=precision, width=width, tile=tile, batch=batch, lambda_rec=lambda_rec,
                     repeat=repeat, warmup=warmup, inference=inference, threads=threads, cprofile_top=cprofile_top,
                     op_profile=op_profile)
    result = run_step_bench(task, reference=not no_reference)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))
