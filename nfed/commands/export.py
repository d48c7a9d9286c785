"""`nfed export`: a checkpoint's weights in formats other tools load (safetensors; ONNX on request)."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.common.paths import refuse_output_over_inputs


@click.command("export")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="checkpoint (.h5)")
@click.option("--format", "fmt", type=click.Choice(["safetensors"]), default="safetensors", show_default=True,
              help="weights format (PyTorch-compatible names, pickle-free)")
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="output file (default: the checkpoint's path with .safetensors)")
@click.option("--onnx", "with_onnx", is_flag=True, help="also write the U-Encoder as ONNX beside it (.onnx)")
def export(model_path, fmt, out_path, with_onnx):
    """Export a checkpoint's weights (and, with --onnx, the prediction graph) for other frameworks."""
    from nfed.model.export import export_onnx, export_safetensors
    from nfed.training.trainer import checkpoint_tile, model_from_checkpoint

    given = out_path is not None
    out_path = out_path or model_path.with_suffix(".safetensors")
    onnx_path = out_path.with_suffix(".onnx")
    refuse_output_over_inputs(out_path, {"--model": model_path}, "--out" if given else "the default --out")
    if with_onnx:
        refuse_output_over_inputs(onnx_path, {"--model": model_path}, "--onnx")
    model, checkpoint = model_from_checkpoint(model_path)
    tile = checkpoint_tile(checkpoint)
    export_safetensors(model, tile, out_path)
    click.echo(f"wrote {out_path} ({len(model.state_dict())} tensors, width {model.width}, "
               f"classes {model.classes}, tile {tile})")
    if with_onnx:
        export_onnx(model, tile, onnx_path)
        click.echo(f"wrote {onnx_path} (U-Encoder: past, current -> logits, probabilities)")
