"""Districts that differ (issue 24): BatchNorm policies x FedAvg/FedProx on the demo's 25 districts, several seeds.

    python bench/bench_noniid.py --out DIR [--seeds 0 1 2] [--policies shared fedbn silobn] [--prox-mu 0 0.01]
    python bench/bench_noniid.py --out DIR --test      # 3 districts, tiny scale: checks the script in a minute

Every cell of the grid runs under `nfed demo`'s fair protocol (nfed.demo.DemoSettings) on the same synthetic
data. Per seed the local and centralised columns do not depend on the federation, so they are trained once (in
the grid's first cell, shared FedAvg) and copied into the other cells, which train only their federated and
personalised columns. A finished cell (its report/summary.json exists) is not run again: the grid can be
stopped and continued. DIR/noniid.json and DIR/noniid.md hold, per cell: mean F1 of the four columns with 95 %
t-intervals over seeds, rounds to the stop rule, bytes each client sends per round, the best and worst district
(federated F1, seed means), and the districts whose federated F1 >= local - 0.01.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.demo import DemoSettings, _Stages, make_data, run_columns
from nfed.report.build import make_study_report
from nfed.report.stats import mean_interval
from nfed.runs.packs import find_packs
from nfed.runs.runfolder import ROUNDS_NAME, SUMMARY_NAME, read_rounds

COLUMNS = ("local", "federated", "personalised", "centralised")   # the report's names
REUSED = ("local", "central")   # folders trained once per seed, copied into every other cell   # trained once per seed, copied into every other cell


def cell_name(policy: str, mu: float) -> str:
    return f"{policy}-mu{mu:g}"


def run_cell(out: Path, packs: dict, settings: DemoSettings, seed: int, policy: str, mu: float, base: Path | None,
             echo) -> Path:
    """One seed of one grid cell into OUT/seed-<k>/<cell>/ (skipped when already finished)."""
    run_dir = out / f"seed-{seed}" / cell_name(policy, mu)
    if (run_dir / "report" / "summary.json").is_file():
        echo(f"[noniid] seed {seed} {cell_name(policy, mu)}: finished before, kept")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = ("local", "federated", "personalised", "central")
    if base is not None and base != run_dir:
        for column in REUSED:
            shutil.rmtree(run_dir / column, ignore_errors=True)
            shutil.copytree(base / column, run_dir / column)
        columns = ("federated", "personalised")
    started = time.perf_counter()
    cell = replace(settings, norm_policy=policy, prox_mu=mu, seeds=(seed,))
    run_columns(run_dir, packs, cell, seed, _Stages(echo), echo, columns=columns)
    make_study_report([run_dir], run_dir / "report", figures=False)
    write_json_atomic(run_dir / "cell.json", {"policy": policy, "prox_mu": mu, "seed": seed, "columns": columns,
                                              "wall_seconds": round(time.perf_counter() - started, 1)})
    return run_dir


def cell_facts(run_dirs: list[Path]) -> dict:
    """What the README's table shows of one cell over its seeds."""
    comparison = make_study_report(run_dirs, run_dirs[0].parent.parent / "reports" / run_dirs[0].name,
                                   figures=False) if len(run_dirs) > 1 else \
        make_study_report(run_dirs, run_dirs[0] / "report", figures=False)
    summary = comparison.summary
    over = summary.get("over_seeds", {})

    def interval(key: str) -> dict:
        return over[key] if key in over else mean_interval([summary.get(key)])

    rounds, stop_rules, shared = [], [], []
    for run_dir in run_dirs:
        federation = json.loads((run_dir / "federated" / SUMMARY_NAME).read_text())
        rounds.append(federation.get("rounds"))
        stop_rules.append(federation.get("stop_rule"))
        records = read_rounds(run_dir / "federated" / ROUNDS_NAME)
        shared.append(records[0].get("shared_bytes") if records else None)
    rows = comparison.rows
    by_federated = sorted((r for r in rows if r.get("f1_federated") is not None), key=lambda r: r["f1_federated"])
    kept = sum(1 for r in rows if None not in (r.get("f1_federated"), r.get("f1_local"))
               and r["f1_federated"] >= r["f1_local"] - 0.01)
    return {"seeds": len(run_dirs), "districts": len(rows),
            **{f"f1_{c}": interval(f"mean_f1_{c}") for c in COLUMNS},
            "rounds": mean_interval(rounds), "stop_rules": stop_rules, "shared_bytes_per_client_round": shared[0],
            "worst": by_federated[0]["district"] if by_federated else None,
            "worst_f1": by_federated[0]["f1_federated"] if by_federated else None,
            "best": by_federated[-1]["district"] if by_federated else None,
            "best_f1": by_federated[-1]["f1_federated"] if by_federated else None,
            "federated_ge_local_minus_0.01": kept,
            "wall_seconds": [json.loads((d / "cell.json").read_text())["wall_seconds"]
                             for d in run_dirs if (d / "cell.json").is_file()]}


def _cell(value: dict) -> str:
    if value.get("mean") is None:
        return "–"
    if value.get("low") is None:
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {(value['high'] - value['low']) / 2:.3f}"


def table(results: dict) -> str:
    lines = ["| cell | seeds | local | federated | personalised | centralised | rounds | MB/client/round "
             "| worst (fed F1) | best (fed F1) | fed >= local - 0.01 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, facts in results.items():
        shared = facts["shared_bytes_per_client_round"]
        lines.append(
            f"| {name} | {facts['seeds']} | {_cell(facts['f1_local'])} | {_cell(facts['f1_federated'])} | "
            f"{_cell(facts['f1_personalised'])} | {_cell(facts['f1_centralised'])} | {_cell(facts['rounds'])} | "
            f"{'–' if shared is None else f'{shared / 1e6:.3f}'} | {facts['worst']} ({facts['worst_f1']:.3f}) | "
            f"{facts['best']} ({facts['best_f1']:.3f}) | {facts['federated_ge_local_minus_0.01']}/"
            f"{facts['districts']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["shared", "fedbn", "silobn"],
                        choices=["shared", "fedbn", "silobn"])
    parser.add_argument("--prox-mu", type=float, nargs="+", default=[0.0])
    parser.add_argument("--test", action="store_true", help="3 districts at a tiny scale (checks the script)")
    args = parser.parse_args(argv)
    settings = DemoSettings(quiet=True)
    if args.test:
        settings = replace(settings, districts="Gangnam-gu,Jung-gu,Nowon-gu", max_rounds=4, warmup_rounds=1,
                           val_tiles=2, test_tiles=2, epochs=3, scale=0.002)
    grid = [(policy, mu) for mu in args.prox_mu for policy in args.policies]
    if ("shared", 0.0) in grid:   # the study's method first: the other cells reuse its local and centralised
        grid.remove(("shared", 0.0))
        grid.insert(0, ("shared", 0.0))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def echo(text: str) -> None:
        print(text, flush=True)

    packs = find_packs(out / "packs") if (out / "packs").is_dir() else make_data(out, settings, echo)
    runs: dict[str, list[Path]] = {cell_name(p, m): [] for p, m in grid}
    for seed in args.seeds:
        base = None
        for policy, mu in grid:
            run_dir = run_cell(out, packs, settings, seed, policy, mu, base, echo)
            base = base or run_dir
            runs[cell_name(policy, mu)].append(run_dir)
            results = {name: cell_facts(dirs) for name, dirs in runs.items() if dirs}
            write_json_atomic(out / "noniid.json", {"settings": settings.to_dict(), "cells": results})
            write_text_atomic(out / "noniid.md", table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
