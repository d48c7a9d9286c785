"""The study's columns besides the federation: local, personalised and centralised models.

- local: each district trains from scratch on its own data (the study's "before FL" column);
- personalised: the federation's global model fine-tuned on each district's own training split (the
  study's future work); fine-tuning that never beats the global model on validation keeps it;
- centralised: one model on the pooled training splits of all districts (the upper bound every FL paper
  reports), scored on every district's test split.
Every side stops by early stopping on validation (patience from the TrainConfig) under an epoch cap, and
records why it stopped and how many optimiser steps it took, so the report can tell a fair comparison.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from nfed.common.atomic import make_folder, write_json_atomic
from nfed.runs.results import test_facts
from nfed.training.environment import RunEnvironment, default_environment

METRIC_KEYS = ("precision", "recall", "f1", "iou", "oa", "kappa")
# Fine-tuning a trained model takes smaller steps than training it from scratch (the usual practice in
# transfer learning): a fresh Adam at the full rate first throws the global model off its optimum.
FINE_TUNE_LR_FACTOR = 0.1


def fine_tune_config(config):
    """The personalised column's set-up: the training config with the learning rate scaled down."""
    return config.replace(lr=config.lr * FINE_TUNE_LR_FACTOR)
COUNT_KEYS = ("tp", "fp", "fn", "tn", "loss")


def _fit_facts(result) -> dict:
    return {"epochs_run": result.epochs_run, "steps": result.steps, "stop": result.stop,
            "stop_epoch": result.stop_epoch, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "wall_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s}


def _scores(model, pack, config) -> tuple[str, dict]:
    from nfed.training.trainer import evaluate

    split = "test" if pack.num_samples("test") else "val"
    return split, evaluate(model, pack, split, config.batch_size)


def _district_summary(pack, model, config, result, env) -> dict:
    split, scores = _scores(model, pack, config)
    samples = sum(pack.num_samples(s) for s in ("train", "val", "test"))
    return {"district": pack.district, "samples": samples, "train_samples": result.num_train_samples,
            "split": split, **{k: scores[k] for k in METRIC_KEYS + COUNT_KEYS},
            **test_facts(scores, pack.tile), **_fit_facts(result), "tile": pack.tile,
            "config": config.to_dict(), "environment": env.to_dict()}


def _train_and_save(pack, out_dir: Path, config, model, env, *, quiet: bool, validate_start: bool,
                    extra_config: Mapping | None = None) -> dict:
    """Fit `model` on the pack with early stopping, score it, write best.h5, metrics.json, epochs.jsonl."""
    from nfed.model.checkpoint import save_checkpoint
    from nfed.training.trainer import build_optimizer, fit

    run_dir = out_dir / pack.district
    make_folder(run_dir)
    log_path = run_dir / "epochs.jsonl"
    log_path.unlink(missing_ok=True)
    optimizer = build_optimizer(model, config)
    result = fit(model, optimizer, pack, config, epochs=config.epochs, early_stopping=True,
                 progress=not quiet, log_path=log_path, validate_start=validate_start)
    summary = _district_summary(pack, model, config, result, env)
    save_checkpoint(run_dir / "best.h5", model.state_dict(), optimizer_state=optimizer.state_dict(),
                    config={**config.to_dict(), "tile": pack.tile, "district": pack.district,
                            "environment": env.to_dict(), **dict(extra_config or {})},
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


def personalise_district(global_weights: Mapping, pack_path: str | Path, out_dir: str | Path, config, *,
                         env: RunEnvironment | None = None, quiet: bool = True, source: str = "global weights") -> dict:
    """Personalised column: fine-tune the global weights on one district's training split with early
    stopping (a fresh optimiser); the global weights themselves count as epoch 0, so a district whose
    validation loss fine-tuning never lowers keeps them (best_epoch 0)."""
    from nfed.model.checkpoint import check_state_matches
    from nfed.data.reader import DistrictPack
    from nfed.training.trainer import build_model

    env = env or default_environment()
    model = build_model(config, env.device)
    check_state_matches(model.state_dict(), global_weights, source)
    model.load_state_dict(dict(global_weights))
    with env.active(), DistrictPack(pack_path) as pack:
        return _train_and_save(pack, Path(out_dir), config, model, env, quiet=quiet, validate_start=True,
                               extra_config={"personalised_from": "global"})


def train_central(pack_paths: Sequence[str | Path], out_dir: str | Path, config, *,
                  env: RunEnvironment | None = None, quiet: bool = True) -> tuple[dict, list[dict]]:
    """Centralised column: one model on the pooled training splits of all districts, early stopping on the
    pooled validation splits; scored on every district's test split.

    Writes OUT/best.h5, OUT/epochs.jsonl and OUT/summary.json; returns (summary, per-district rows)."""
    from nfed.model.checkpoint import save_checkpoint
    from nfed.data.reader import DistrictPack, PooledPacks
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
            split, scores = _scores(model, pack, config)
            rows.append({"district": pack.district,
                         "samples": sum(pack.num_samples(s) for s in ("train", "val", "test")),
                         "train_samples": pack.num_samples("train"), "split": split,
                         **{k: scores[k] for k in METRIC_KEYS + COUNT_KEYS}, **test_facts(scores, pack.tile)})
    summary = {"train_samples": result.num_train_samples, "districts": districts, "tile": tile,
               **_fit_facts(result), "config": config.to_dict(), "environment": env.to_dict()}
    save_checkpoint(out_dir / "best.h5", model.state_dict(), optimizer_state=optimizer.state_dict(),
                    config={**config.to_dict(), "tile": tile, "district": "pooled", "environment": env.to_dict()},
                    metrics=summary)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary, rows
