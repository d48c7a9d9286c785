"""The study's columns besides the federation: local, personalised and centralised models.

- local: each district trains from scratch on its own data (the study's "before FL" column);
- personalised: the federation's global model fine-tuned on each district's own training split (the
  study's future work); fine-tuning that never beats the global model on validation keeps it; under a norm
  policy other than shared each district starts from the global model with its own BatchNorm of that round;
- centralised: one model on the pooled training splits of all districts (the upper bound every FL paper
  reports), scored on every district's test split.
Every side stops by early stopping on validation (patience from the TrainConfig) under an epoch cap, and
records why it stopped and how many optimiser steps it took, so the report can tell a fair comparison.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from nfed.common.atomic import make_folder, write_json_atomic
from nfed.common.errors import ConfigError
from nfed.common.names import child_path
from nfed.runs.results import FILE_NAMES, test_facts, write_results_csv
from nfed.runs.runfolder import CLIENT_STATE_NAME, client_local_state
from nfed.runs.runlock import held_folder
from nfed.training.environment import RunEnvironment, default_environment

METRIC_KEYS = ("precision", "recall", "f1", "iou", "oa", "kappa")
COUNT_KEYS = ("tp", "fp", "fn", "tn", "loss")
# Fine-tuning a trained model takes smaller steps than training it from scratch (the usual practice in
# transfer learning): a fresh Adam at the full rate first throws the global model off its optimum.
FINE_TUNE_LR_FACTOR = 0.1


def fine_tune_config(config):
    """The personalised column's set-up: the training config with the learning rate scaled down."""
    return config.replace(lr=config.lr * FINE_TUNE_LR_FACTOR)


def _fit_facts(result) -> dict:
    return {"epochs_run": result.epochs_run, "steps": result.steps, "stop": result.stop,
            "stop_epoch": result.stop_epoch, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "wall_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s}


def _test_row(model, pack, config, train_samples: int) -> dict:
    """A model's results-table row on one district: its test split (val when it has none), counts and metrics."""
    from nfed.training.trainer import evaluate

    split = "test" if pack.num_samples("test") else "val"
    scores = evaluate(model, pack, split, config.batch_size)
    return {"district": pack.district, "samples": sum(pack.num_samples(s) for s in ("train", "val", "test")),
            "train_samples": train_samples, "split": split, **{k: scores[k] for k in METRIC_KEYS + COUNT_KEYS},
            **test_facts(scores, pack.tile)}


def _district_summary(pack, model, config, result, env) -> dict:
    return {**_test_row(model, pack, config, result.num_train_samples), **_fit_facts(result), "tile": pack.tile,
            "config": config.to_dict(), "environment": env.record()}


def _train_and_save(pack, out_dir: Path, config, model, env, *, quiet: bool, validate_start: bool,
                    extra_config: Mapping | None = None) -> dict:
    """Fit `model` on the pack with early stopping, score it, write best.h5, metrics.json, epochs.jsonl."""
    from nfed.model.checkpoint import save_checkpoint
    from nfed.training.trainer import build_optimizer, fit

    run_dir = child_path(out_dir, pack.district, source=str(pack.path))
    make_folder(run_dir)
    log_path = run_dir / "epochs.jsonl"
    log_path.unlink(missing_ok=True)
    optimizer = build_optimizer(model, config)
    result = fit(model, optimizer, pack, config, epochs=config.epochs, early_stopping=True,
                 progress=not quiet, log_path=log_path, validate_start=validate_start)
    summary = _district_summary(pack, model, config, result, env)
    save_checkpoint(run_dir / "best.h5", model.state_dict(), optimizer_state=optimizer.state_dict(),
                    config={**config.to_dict(), "tile": pack.tile, "district": pack.district,
                            "environment": env.record(), **dict(extra_config or {})},
                    metrics=summary)
    write_json_atomic(run_dir / "metrics.json", summary)
    return summary


def train_district(pack_path: str | Path, out_dir: str | Path, config, *, env: RunEnvironment | None = None,
                   quiet: bool = True) -> dict:
    """Local column: train one district from scratch, score it on its test split, write its run folder
    OUT/<district>/ (best.h5, metrics.json, epochs.jsonl); returns its local.csv row (and more)."""
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import build_model

    env = env or default_environment()
    with env.active(), DistrictPack(pack_path) as pack:
        return _train_and_save(pack, Path(out_dir), config, build_model(config, env.device), env, quiet=quiet,
                               validate_start=False)


def local_states_of(checkpoint, path: str | Path) -> tuple[Path, int] | None:
    """Where the districts' own BatchNorm tensors of a federated checkpoint's round are: (run folder, round) when
    the run's norm policy keeps them per district (RUN/client_state/), None when it shares everything."""
    federation = checkpoint.config.get("federation")
    policy = federation.get("norm_policy", "shared") if isinstance(federation, dict) else "shared"
    if policy == "shared":
        return None
    run_dir = Path(path).parent
    if not (run_dir / CLIENT_STATE_NAME).is_dir():
        raise ConfigError(f"{path}: its run (--norm-policy {policy}) keeps each district's BatchNorm in "
                          f"{run_dir / CLIENT_STATE_NAME}, which is not there: give the checkpoint in its run folder")
    return run_dir, int(checkpoint.round or 0)


def personalise_district(global_weights: Mapping, pack_path: str | Path, out_dir: str | Path, config, *,
                         env: RunEnvironment | None = None, quiet: bool = True, source: str = "global weights",
                         local_states: tuple[Path, int] | None = None) -> dict:
    """Personalised column: fine-tune the global weights on one district's training split with early
    stopping (a fresh optimiser); the global weights themselves count as epoch 0, so a district whose
    validation loss fine-tuning never lowers keeps them (best_epoch 0). `local_states` (local_states_of):
    the district starts with its own BatchNorm tensors of that round in place."""
    from nfed.data.reader import DistrictPack
    from nfed.model.checkpoint import check_state_matches
    from nfed.training.trainer import build_model

    env = env or default_environment()
    model = build_model(config, env.device)
    expected = model.state_dict()
    check_state_matches(expected, global_weights, source)
    with env.active(), DistrictPack(pack_path) as pack:
        own = {}
        if local_states is not None:   # the district's own BatchNorm: only names and shapes the model has
            own = client_local_state(local_states[0], pack.district, local_states[1] + 1) or {}
            check_state_matches({name: expected[name] for name in own if name in expected}, own,
                                local_states[0] / CLIENT_STATE_NAME)
        model.load_state_dict({**global_weights, **own})
        return _train_and_save(pack, Path(out_dir), config, model, env, quiet=quiet, validate_start=True,
                               extra_config={"personalised_from": "global"})


def train_central(pack_paths: Sequence[str | Path], out_dir: str | Path, config, *,
                  env: RunEnvironment | None = None, quiet: bool = True) -> tuple[dict, list[dict]]:
    """Centralised column: one model on the pooled training splits of all districts, early stopping on the
    pooled validation splits; scored on every district's test split.

    Writes OUT/best.h5, OUT/epochs.jsonl, OUT/summary.json and OUT/central.csv (the model on each district's
    test split); returns (summary, per-district rows)."""
    from nfed.data.reader import DistrictPack, PooledPacks
    from nfed.model.checkpoint import save_checkpoint
    from nfed.training.trainer import build_model, build_optimizer, fit

    out_dir = Path(out_dir)
    make_folder(out_dir)
    log_path = out_dir / "epochs.jsonl"
    log_path.unlink(missing_ok=True)
    env = env or default_environment()
    model = build_model(config, env.device)
    optimizer = build_optimizer(model, config)
    with env.active(), PooledPacks(pack_paths) as pooled:
        result = fit(model, optimizer, pooled, config, epochs=config.epochs, early_stopping=True,
                     progress=not quiet, log_path=log_path)
        tile = pooled.tile
        districts = [pack.district for pack in pooled.packs]
    rows = []
    for path in pack_paths:
        with env.active(), DistrictPack(path) as pack:
            rows.append(_test_row(model, pack, config, pack.num_samples("train")))
    summary = {"train_samples": result.num_train_samples, "districts": districts, "tile": tile,
               **_fit_facts(result), "config": config.to_dict(), "environment": env.record()}
    save_checkpoint(out_dir / "best.h5", model.state_dict(), optimizer_state=optimizer.state_dict(),
                    config={**config.to_dict(), "tile": tile, "district": "pooled", "environment": env.record()},
                    metrics=summary)
    write_json_atomic(out_dir / "summary.json", summary)
    write_results_csv(out_dir / FILE_NAMES["central"], rows, "central")
    return summary, rows


# ------------------------------------------------------------------------------------------ whole columns

def _column(out_dir: str | Path, kind: str | None, rows_of: Callable[[Path], list[dict]]) -> list[dict]:
    """Run a column in the run folder OUT, held while it is written; `kind`: the results table
    written as OUT/<kind>.csv (None: none)."""
    out_dir = Path(out_dir)
    with held_folder(out_dir):
        rows = rows_of(out_dir)
        if kind is not None:
            write_results_csv(out_dir / FILE_NAMES[kind], rows, kind)
    return rows


def local_column(pack_paths: Sequence[str | Path], out_dir: str | Path, config, *, env: RunEnvironment | None = None,
                 quiet: bool = True, table: bool = True, on_row: Callable[[dict], None] = lambda row: None
                 ) -> list[dict]:
    """Local column: every district trained in turn (train_district); with `table`, OUT/local.csv."""
    def rows_of(out: Path) -> list[dict]:
        return [_said(train_district(path, out, config, env=env, quiet=quiet), on_row) for path in pack_paths]
    return _column(out_dir, "local" if table else None, rows_of)


def personalised_column(global_weights: Mapping, pack_paths: Sequence[str | Path], out_dir: str | Path, config, *,
                        env: RunEnvironment | None = None, quiet: bool = True, source: str = "global weights",
                        on_row: Callable[[dict], None] = lambda row: None,
                        local_states: tuple[Path, int] | None = None) -> list[dict]:
    """Personalised column: the global weights fine-tuned on every district in turn; OUT/personalised.csv."""
    def rows_of(out: Path) -> list[dict]:
        return [_said(personalise_district(global_weights, path, out, config, env=env, quiet=quiet, source=source,
                                           local_states=local_states), on_row) for path in pack_paths]
    return _column(out_dir, "personalised", rows_of)


def central_column(pack_paths: Sequence[str | Path], out_dir: str | Path, config, *,
                   env: RunEnvironment | None = None, quiet: bool = True) -> tuple[dict, list[dict]]:
    """Centralised column (train_central) in the run folder OUT, held while it is written."""
    out_dir = Path(out_dir)
    with held_folder(out_dir):
        return train_central(pack_paths, out_dir, config, env=env, quiet=quiet)


def _said(row: dict, on_row: Callable[[dict], None]) -> dict:
    on_row(row)
    return row


def model_setup(trained: Mapping, given: Mapping, source: str | Path) -> dict:
    """The model set-up (width, classes, lambda_rec) a fine-tuning takes from the checkpoint it starts from:
    `given` values must agree with it (ConfigError naming the option)."""
    setup = {}
    for key in ("width", "classes", "lambda_rec"):
        value = given.get(key)
        if value is not None and str(value) != str(trained.get(key)):
            raise ConfigError(f"--{key.replace('_', '-')} {value}: the model in {source} has {key} {trained.get(key)}")
        if key in trained:
            setup[key] = trained[key]
    return setup


def score_checkpoint(model_path: str | Path, data_path: str | Path, split: str = "test", batch_size: int = 8, *,
                     env: RunEnvironment | None = None) -> dict:
    """A checkpoint's change metrics on one split of a pack, or of every pack of a folder and pooled over all of
    them (`nfed evaluate`)."""
    from nfed.core.metrics import ConfusionMatrix
    from nfed.data.reader import DistrictPack
    from nfed.runs.packs import find_packs
    from nfed.training.trainer import evaluate, model_from_checkpoint

    env = env or default_environment()
    model, _ = model_from_checkpoint(model_path, device=env.device)
    data_path = Path(data_path)
    pack_paths = list(find_packs(data_path).values()) if data_path.is_dir() else [data_path]
    overall = ConfusionMatrix()
    districts = []
    with env.active():
        for path in pack_paths:
            with DistrictPack(path) as pack:
                scores = evaluate(model, pack, split, batch_size, confusion=overall)
                districts.append({"district": pack.district, **scores})
    return {"model": str(model_path), "split": split, "districts": districts,
            "overall": {"samples": sum(d["samples"] for d in districts), **overall.metrics()},
            "environment": env.record()}
