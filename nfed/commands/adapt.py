"""`nfed adapt`: AdaBN, a checkpoint's BatchNorm statistics re-estimated on one district's own tiles."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.commands.options import device_option, limited, precision_option, run_environment
from nfed.common.paths import refuse_output_over_inputs


@click.command("adapt")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="checkpoint (.h5)")
@click.option("--data", "pack_path", required=True, type=click.Path(path_type=Path), help="the district's pack (.h5)")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="adapted checkpoint (.h5)")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True,
              help="the tiles whose statistics are taken (labels are not read)")
@click.option("--batch-size", type=limited("batch_size"), default=8, show_default=True,
              help="tiles per forward pass (each normalised by its own statistics, as in training)")
@device_option
@precision_option
def adapt(model_path, pack_path, out_path, split, batch_size, device, precision):
    """Re-estimate every BatchNorm layer's running mean and variance on a district's tiles (AdaBN: forward
    passes only; no labels, no training) and write them with the model's other weights unchanged as a new
    checkpoint, which `nfed evaluate` and `nfed predict` accept."""
    from nfed.training.adapt import adapt_checkpoint

    refuse_output_over_inputs(out_path, {"--model": model_path, "--data": pack_path})
    env = run_environment(device, precision)
    done = adapt_checkpoint(model_path, pack_path, out_path, split=split, batch_size=batch_size, env=env)
    click.echo(f"wrote {out_path}: BatchNorm statistics of {model_path} re-estimated on {done['district']}'s "
               f"{done['tiles']} {split} tile(s)")
