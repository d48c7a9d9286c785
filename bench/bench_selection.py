"""Which round a federation keeps, and when it stops: every selection rule and stop patience on recorded curves.

`record` runs the demo-profile federation (nfed demo's data, model, optimiser and protocol: 3 local epochs per
round, warm-up 10, budget 200 as `nfed federate`, the demo's worker pool) once per seed with the validation-loss
stop rule at the largest patience measured (10), and keeps every round's global weights beside the run
(OUT/<data>/seed-<k>/weights/round-N.h5, the bench's own side files: no rule ever sees a test split). Smaller
patiences stop no later than the recorded run, so one run per seed gives every (rule, patience) pair exactly.
`analyse` then replays the stop rule (nfed.federation.stop_rules.StopRules) and every selection rule
(nfed.federation.selection) on the recorded rounds.jsonl, scores each kept round's weights on every district's test
split (mean per-district test F1, as the report's federated column) and writes OUT/selection.json and
OUT/selection.md: per rule and patience, the stop round, the kept round and its test F1 per seed, and the paired
difference against today's rule (lowest validation loss, patience 3) with a 95 % t interval over seeds. Two kinds of
stop rule are replayed: the validation-loss rule (`stop loss pP`) and "no new kept round under the selection rule
for P rounds after the warm-up" (`stop <rule>/<window> pP`, with that rule keeping the round); a stop the recorded
run did not reach is marked '+' (censored: the recorded run ended first). A `record` cut short continues from its
last checkpoint when run again.

Data: `demo` = nfed demo's 25 synthetic districts (nfed.demo.make_data); `levir` = the real LEVIR-CD sample tiles
packed into 3 pseudo-districts (a --district-map, 64 px tiles, split 0.6/0.2/0.2), as the README's LEVIR section.

    python bench/bench_selection.py record --out /tmp/bench_selection --data demo --seeds 0,1,2
    python bench/bench_selection.py record --out /tmp/bench_selection --data levir --seeds 0,1,2 \
        --levir ../shared/data/levir-cd-samples
    python bench/bench_selection.py analyse --out /tmp/bench_selection
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.demo import DemoSettings, federation_config, make_data
from nfed.federation.config import FederationConfig
from nfed.federation.selection import kept_round
from nfed.federation.server import Federation
from nfed.model.checkpoint import load_checkpoint, save_checkpoint
from nfed.runs.packs import find_packs
from nfed.runs.runfolder import ROUNDS_NAME, read_rounds
from nfed.training.trainer import profile_config

from federation_grid import levir_packs   # noqa: E402 - bench/ is the script's folder

PATIENCES = (3, 5, 10)
RECORD_PATIENCE = max(PATIENCES)
TODAY = "stop loss p3 | keep loss/1 warm-up 0"   # the rule before issue 30


class RecordingFederation(Federation):
    """A Federation that also keeps every round's global weights (the bench's side file, never selected on)."""

    weights_dir: Path

    def _track_best(self, weights, record: dict) -> None:
        super()._track_best(weights, record)
        save_checkpoint(self.weights_dir / f"round-{record['round']}.h5", weights, round=record["round"])


def demo_packs(out: Path) -> dict[str, Path]:
    folder = out / "demo-data"
    if (folder / "packs").is_dir():
        return find_packs(folder / "packs")
    return make_data(folder, DemoSettings(quiet=True), print)


def federation_settings(settings: DemoSettings, seed: int, patience: int) -> FederationConfig:
    """nfed demo's federation (nfed.demo.federation_config) at another stop patience, under the bench's budget."""
    return replace(federation_config(settings, seed), patience_rounds=patience, rounds=BUDGET)


def record(out: Path, data: str, seeds: list[int], levir: Path | None) -> None:
    from nfed.federation.district_jobs import PoolRunner, worker_pool

    packs = demo_packs(out) if data == "demo" else levir_packs(out, levir)
    settings = DemoSettings(quiet=True)
    for seed in seeds:
        run_dir = out / data / f"seed-{seed}"
        if (run_dir / "run" / "summary.json").is_file():
            print(f"{run_dir}: recorded already")
            continue
        config = profile_config("demo", seed=seed, epochs=settings.epoch_cap, patience=settings.patience)
        fed = federation_settings(settings, seed, RECORD_PATIENCE)
        started = time.perf_counter()
        with worker_pool(settings.district_jobs, len(packs), say=False) as pool, \
                PoolRunner(pool, run_dir / "work", packs) as runner:
            federation = RecordingFederation(packs, run_dir / "run", config, fed, echo=print, runner=runner,
                                             evaluate_fn=runner.evaluate)
            federation.weights_dir = run_dir / "weights"
            federation.weights_dir.mkdir(parents=True, exist_ok=True)
            # a recording cut short (killed, machine gone) continues from its last round's checkpoint
            resume = (run_dir / "run" / "global.h5").is_file()
            result = federation.run(resume=True) if resume else federation.run(overwrite=True)
        write_json_atomic(run_dir / "recorded.json", {"seed": seed, "data": data, "rounds": len(result.rounds),
                                                      "stop_reason": result.stop_reason,
                                                      "seconds": round(time.perf_counter() - started, 1)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "analyse"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", choices=("demo", "levir"), default="demo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--levir", type=Path, default=Path("../shared/data/levir-cd-samples"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.mode == "record":
        record(args.out, args.data, seeds, args.levir)
    else:
        analyse(args.out)
    return 0


RULES = (("loss", 1), ("f1", 1), ("loss-ma", 3), ("f1-ma", 3), ("loss-ma", 5), ("f1-ma", 5))
# the demo's (and nfed federate's) warm-up and round budget: the recording's run is the default federation
WARMUP, BUDGET = DemoSettings().warmup_rounds, DemoSettings().max_rounds


def stop_round(records: list[dict], patience: int, rule: str | None = None, window: int = 1) -> int | None:
    """The round a stop rule ends the run after, replayed on the records (None: not within them, i.e. the
    recorded run ended first). `rule` None: the validation-loss rule (StopRules); else "no new kept round under
    the selection rule for `patience` rounds after the warm-up"."""
    from nfed.federation.selection import Selection
    from nfed.federation.stop_rules import StopRules

    stop = StopRules(max_rounds=BUDGET, patience_rounds=patience, warmup_rounds=WARMUP)
    selection = Selection(rule, window, WARMUP) if rule else None
    for record in records:
        number = record["round"]
        if selection is None:
            if stop.check(number, record.get("norm_difference"), record.get("mean_val_loss")):
                return number
        else:
            selection.update(record)
            if number > WARMUP and number - max(selection.best_round, WARMUP) >= patience or number >= BUDGET:
                return number
    return None


def mean_test_f1(run_dir: Path, packs: dict[str, Path], round_number: int, cache: dict) -> float:
    """Mean over districts of the test F1 of round `round_number`'s global weights (cached in test_f1.json)."""
    from nfed.federation.client import evaluate_weights, make_round_setup

    key = str(round_number)
    if key not in cache:
        settings = DemoSettings(quiet=True)
        config = profile_config("demo", epochs=settings.epoch_cap, patience=settings.patience)
        weights = load_checkpoint(run_dir / "weights" / f"round-{round_number}.h5").model_state
        setup = make_round_setup(config, round_number, settings.local_epochs)
        f1s = [evaluate_weights(weights, setup, path, split="test")["f1"] for path in packs.values()]
        cache[key] = sum(f1s) / len(f1s)
        write_json_atomic(run_dir / "test_f1.json", cache)
    return cache[key]


def analyse_run(run_dir: Path, packs: dict[str, Path]) -> dict:
    """Every (stop rule, patience, selection rule): its stop round, kept round and that round's test F1."""
    import json

    records = read_rounds(run_dir / "run" / ROUNDS_NAME)
    cache_path = run_dir / "test_f1.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    finished = (run_dir / "recorded.json").is_file()
    cells = {}
    for stop_by in ("loss",) + tuple(f"{r}/{w}" for r, w in RULES if (r, w) != ("loss", 1)):
        for patience in PATIENCES:
            rule_of_stop = None if stop_by == "loss" else stop_by.split("/")[0]
            window = 1 if stop_by == "loss" else int(stop_by.split("/")[1])
            end = stop_round(records, patience, rule_of_stop, window)
            censored = end is None   # the recorded run (or the recording so far) ended first
            end = end or records[-1]["round"]
            for rule, w in RULES:
                for warmup in (0, WARMUP):
                    if stop_by != "loss" and (stop_by != f"{rule}/{w}" or not warmup):
                        continue   # a selection-rule stop goes with its own rule (after the warm-up)
                    kept = kept_round(rule, w, records[:end], warmup) or end   # none kept: the last round
                    cells[f"stop {stop_by} p{patience} | keep {rule}/{w} warm-up {warmup}"] = {
                        "stop_round": end, "censored": censored, "kept_round": kept,
                        "val_f1": records[kept - 1].get("mean_val_f1"),
                        "test_f1": mean_test_f1(run_dir, packs, kept, cache)}
    return {"rounds": len(records), "finished": finished, "cells": cells,
            "curve": [[r["round"], r.get("mean_val_loss"), r.get("mean_val_f1")] for r in records]}


def analyse(out: Path) -> None:
    from nfed.report.stats import mean_interval

    found = {}
    for data in ("demo", "levir"):
        runs = sorted((out / data).glob("seed-*/run/rounds.jsonl"))
        if not runs:
            continue
        packs = find_packs(out / f"{data}-data" / "packs")
        found[data] = {path.parent.parent.name: analyse_run(path.parent.parent, packs) for path in runs}
    today = TODAY
    lines = ["| data | stop rule, patience | kept by | stop rounds | kept rounds | test F1 per seed | mean | "
             "paired diff vs today, mean [95 % t] |", "|---|---|---|---|---|---|---:|---|"]
    summary = {}
    for data, seeds in found.items():
        for cell in next(iter(seeds.values()))["cells"]:
            values = [run["cells"][cell] for run in seeds.values()]
            diffs = [v["test_f1"] - run["cells"][today]["test_f1"] for v, run in zip(values, seeds.values())]
            interval = mean_interval(diffs)
            summary.setdefault(data, {})[cell] = {"per_seed": values, "diff": interval}
            stop, keep = cell.split(" | ")
            ends = ", ".join(f"{v['stop_round']}{'+' if v['censored'] else ''}" for v in values)
            low = "" if interval["low"] is None else f" [{interval['low']:+.3f}, {interval['high']:+.3f}]"
            lines.append(f"| {data} ({len(values)} seeds) | {stop} | {keep} | {ends} | "
                         f"{', '.join(str(v['kept_round']) for v in values)} | "
                         f"{', '.join(format(v['test_f1'], '.3f') for v in values)} | "
                         f"{sum(v['test_f1'] for v in values) / len(values):.3f} | {interval['mean']:+.3f}{low} |")
    write_json_atomic(out / "selection.json", {"runs": found, "summary": summary})
    write_text_atomic(out / "selection.md", "\n".join(lines) + "\n\n'+': the recorded run ended first (censored)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
