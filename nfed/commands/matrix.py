"""`nfed matrix`: the cross-district matrix of a study run folder (nfed.training.matrix)."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.commands.options import device_option, precision_option, run_environment
from nfed.common.errors import ConfigError
from nfed.common.paths import refuse_output_over_inputs
from nfed.runs.results import f1_text


@click.command("matrix")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="study run folder (RUN/local/<district>/best.h5, RUN/federated/best.h5)")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="folder of district packs")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="folder for matrix.csv and matrix.json "
              "(default: the run folder)")
@device_option
@precision_option
def matrix(run_dir, data_path, split, out_dir, device, precision):
    """Score every district's local model and the global model on every district's split.

    Writes matrix.csv (one row per model: each district's local model, then `global`; one column per district;
    F1 of the change class, blank where a model or pack is missing) and matrix.json (mean in-district and
    out-of-district F1, their gap, the global model's mean). Under --norm-policy fedbn / silobn the global model
    is scored on each district with that district's own BatchNorm of the kept round (RUN/federated/client_state/).
    """
    from nfed.runs.packs import find_packs
    from nfed.training.matrix import MATRIX_NAME, MATRIX_SUMMARY_NAME, run_matrix, run_models

    if not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir}: run folder not found")
    if not data_path.is_dir():
        raise ConfigError(f"--data {data_path}: expected the folder of district packs")
    packs = find_packs(data_path)
    env = run_environment(device, precision)
    inputs = {"--data": list(packs.values()),
              "--run": [path for path in run_models(run_dir, list(packs)).values() if path.exists()]}
    if out_dir is not None:
        refuse_output_over_inputs(out_dir, {"--data": inputs["--data"]})
    target = out_dir if out_dir is not None else run_dir
    for name in (MATRIX_NAME, MATRIX_SUMMARY_NAME):
        refuse_output_over_inputs(target / name, inputs)

    def said(name: str, row: list) -> None:
        scored = [v for v in row if v is not None]
        click.echo(f"{name}: " + (f"mean F1 {sum(scored) / len(scored):.4f} on {len(scored)} districts" if scored
                                  else "no model (blank row)"))

    _, summary = run_matrix(run_dir, packs, split, out_dir=out_dir, env=env, on_row=said)
    click.echo(f"in-district F1 {f1_text(summary['in_district_f1'])}, out-of-district F1 "
               f"{f1_text(summary['out_of_district_f1'])}, gap {f1_text(summary['gap'])}; global model "
               f"{f1_text(summary['global_f1'])} ({summary['seconds']:.1f} s) -> {target / MATRIX_NAME}")
