"""Districts that differ (issue 24): BatchNorm policies x FedAvg/FedProx on the demo's 25 districts, several seeds.

    python bench/bench_noniid.py --out DIR [--seeds 0 1 2] [--policies shared fedbn silobn] [--prox-mu 0 0.01]
    python bench/bench_noniid.py --out DIR --test      # 3 districts, tiny scale: checks the script in a minute
    python bench/bench_noniid.py --out DIR --hold-out-grid [--policies shared]   # + districts that never trained
    python bench/bench_noniid.py --out DIR --table-only [--seeds ...]   # table and figure of the cells finished
    python bench/bench_noniid.py --out DIR --policies shared --compress int8-ef \
        [--protocol patience_rounds=3 --protocol select_by=loss ...]   # compressed updates, another protocol

Every cell of the grid runs under `nfed demo`'s fair protocol (nfed.demo.DemoSettings) on the same synthetic
data. Per seed the local and centralised columns do not depend on the federation, so they are trained once (in
the grid's first cell, shared FedAvg) and copied into the other cells, which train only their federated and
personalised columns. A finished cell (its report/summary.json exists) is not run again: the grid can be
stopped and continued. DIR/noniid.json and DIR/noniid.md hold, per cell: mean F1 of the four columns with 95 %
t-intervals over seeds (DIR/noniid.png: a bar per column and cell, the intervals as whiskers), rounds to the
stop rule, bytes each client sends per round, the best and worst district
(federated F1, seed means), and the districts whose federated F1 >= local - 0.01.

--hold-out-grid adds, per seed and policy (FedAvg), a cell with 5 districts held out together (seeded by the seed,
the same for every policy; `nfed demo --hold-out`): it trains only its federation, reusing the seed's local column,
and its heldout.csv gives each held-out district's test F1 under the global model before and after AdaBN on its own
training tiles, beside its local model; noniid.json's "held_out" and a second table in noniid.md hold the means
over seeds and the adaptation's gain with its 95 % interval (the issue's goal: >= +0.05).

--compress adds a cell per policy and mode other than none (`nfed demo --compress`: the clients' updates int8 or
float16, issue 26): it trains only its federation, reusing the seed's local and centralised columns, and its row
gives the bytes each client sent and received per round beside the F1. --protocol KEY=VALUE sets a field of the
federation's protocol (max_rounds, local_epochs, patience_rounds, warmup_rounds, eps, select_by, select_window),
e.g. to add cells to a folder made under an earlier default; every cell records the settings it ran with
(cell.json), and a call whose protocol differs from the recorded one of a cell in DIR is refused.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from federation_grid import difference_text, interval_text, traffic_per_reply   # noqa: E402 - bench/ on the path

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.common.errors import ConfigError
from nfed.demo import DemoSettings, _Stages, federation_config, make_data, run_columns
from nfed.federation.compression import COMPRESS_MODES
from nfed.report.build import make_study_report
from nfed.report.stats import mean_interval
from nfed.runs.packs import find_packs
from nfed.runs.results import study_table
from nfed.runs.runfolder import ROUNDS_NAME, SUMMARY_NAME, read_rounds

COLUMNS = ("local", "federated", "personalised", "centralised")   # the report's names
REUSED = ("local", "central")   # folders trained once per seed, copied into every other cell
HOLD_OUT = 5                    # districts held out together in a --hold-out-grid cell
PROTOCOL = ("max_rounds", "local_epochs", "patience_rounds", "warmup_rounds", "eps", "select_by", "select_window")


def cell_name(policy: str, mu: float, held_out: int = 0, compress: str = "none") -> str:
    return (f"{policy}-mu{mu:g}" + (f"-holdout{held_out}" if held_out else "")
            + ("" if compress == "none" else f"-{compress}"))


def protocol_settings(settings: DemoSettings, assignments: list[str]) -> DemoSettings:
    """`settings` with the federation protocol's fields set from KEY=VALUE strings (typed like the field)."""
    changes = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or key not in PROTOCOL:
            raise SystemExit(f"--protocol {assignment}: expected KEY=VALUE with KEY one of {', '.join(PROTOCOL)}")
        kind = type(getattr(settings, key))
        try:
            changes[key] = kind(value)
        except ValueError:
            raise SystemExit(f"--protocol {assignment}: {key} takes a {kind.__name__}") from None
    try:   # the demo's and the federation's checks, before any cell trains
        changed = replace(settings, **changes)
        federation_config(changed, seed=0)
    except ConfigError as exc:
        raise SystemExit(f"--protocol {' '.join(assignments)}: {exc}") from None
    return changed


def check_protocol(run_dir: Path, settings: DemoSettings) -> None:
    """Refuse a call whose protocol differs from the one a finished cell in the folder recorded (a table mixing
    protocols would compare unlike runs); cells from before settings were recorded are not checked."""
    recorded = json.loads((run_dir / "cell.json").read_text()).get("settings") if (run_dir / "cell.json").is_file() \
        else None
    if recorded is None:
        return
    mine = settings.to_dict()
    differ = [f"{key}={recorded.get(key)!r} (this call: {mine[key]!r})" for key in PROTOCOL
              if recorded.get(key) != mine[key]]
    if differ:
        raise SystemExit(f"{run_dir} ran under another protocol: {', '.join(differ)}; pass the same --protocol "
                         "or use another --out")


def held_out_districts(districts: list[str], seed: int, count: int = HOLD_OUT) -> tuple[str, ...]:
    """`count` districts chosen by the seed (at most all but one), in the packs' order."""
    chosen = set(random.Random(f"hold-out {seed}").sample(districts, min(count, len(districts) - 1)))
    return tuple(d for d in districts if d in chosen)


def run_cell(out: Path, packs: dict, settings: DemoSettings, seed: int, policy: str, mu: float, base: Path | None,
             echo, hold_out: tuple[str, ...] = (), compress: str = "none") -> Path:
    """One seed of one grid cell into OUT/seed-<k>/<cell>/ (skipped when already finished); with `hold_out` or a
    `compress` mode only its federation is trained (the local models come from `base`)."""
    name = cell_name(policy, mu, len(hold_out), compress)
    run_dir = out / f"seed-{seed}" / name
    check_protocol(run_dir, settings)
    if (run_dir / "report" / "summary.json").is_file():
        echo(f"[noniid] seed {seed} {name}: finished before, kept")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = ("local", "federated", "personalised", "central")
    if base is not None and base != run_dir:
        for column in REUSED:
            shutil.rmtree(run_dir / column, ignore_errors=True)
            shutil.copytree(base / column, run_dir / column)
        columns = ("federated",) if hold_out or compress != "none" else ("federated", "personalised")
    else:   # the seed's base cell: a local or centralised column finished by an interrupted call is kept
        columns = tuple(c for c in columns if c not in REUSED or not study_table(run_dir, c).is_file())
    started = time.perf_counter()
    cell = replace(settings, norm_policy=policy, prox_mu=mu, seeds=(seed,), hold_out=tuple(hold_out),
                   compress=compress)
    run_columns(run_dir, packs, cell, seed, _Stages(echo), echo, columns=columns)
    make_study_report([run_dir], run_dir / "report", figures=False)
    write_json_atomic(run_dir / "cell.json", {"policy": policy, "prox_mu": mu, "seed": seed, "columns": columns,
                                              "hold_out": list(hold_out), "settings": cell.to_dict(),
                                              "wall_seconds": round(time.perf_counter() - started, 1)})
    return run_dir


def holdout_facts(run_dirs: list[Path]) -> dict:
    """What noniid.md's held-out table shows of one policy over its seeds: mean F1 (95 % interval over district and
    seed) of the held-out districts' local, global and adapted models, and the adaptation's gain (adapted - global)
    as the report's summary.json gives it."""
    from nfed.report.heldout import heldout_summary
    from nfed.report.run import read_run

    runs = [read_run(d, f"{d.parent.name}/{d.name}") for d in run_dirs]
    rows = [row for run in runs for row in run.heldout or ()]
    summary = heldout_summary(runs) or {}
    return {"seeds": len(run_dirs), "held_out": {d.parent.name: json.loads((d / "cell.json").read_text())["hold_out"]
                                                  for d in run_dirs if (d / "cell.json").is_file()},
            **{f"f1_{k}": mean_interval([row[f"{k}_f1"] for row in rows]) for k in ("local", "global", "adapted")},
            "gain": {"mean": summary.get("gain"), "low": summary.get("gain_low"), "high": summary.get("gain_high")},
            **{k: summary.get(k) for k in ("improved", "pairs", "goal_gain", "goal_met")}}


def cell_facts(run_dirs: list[Path]) -> dict:
    """What the README's table shows of one cell over its seeds."""
    comparison = make_study_report(run_dirs, run_dirs[0].parent.parent / "reports" / run_dirs[0].name,
                                   figures=False) if len(run_dirs) > 1 else \
        make_study_report(run_dirs, run_dirs[0] / "report", figures=False)
    summary = comparison.summary
    over = summary.get("over_seeds", {})

    def interval(key: str) -> dict:
        return over[key] if key in over else mean_interval([summary.get(key)])

    rounds, stop_rules, shared, up, down = [], [], [], [], []
    for run_dir in run_dirs:
        federation = json.loads((run_dir / "federated" / SUMMARY_NAME).read_text())
        rounds.append(federation.get("rounds"))
        stop_rules.append(federation.get("stop_rule"))
        records = read_rounds(run_dir / "federated" / ROUNDS_NAME)
        shared.append(records[0].get("shared_bytes") if records else None)
        traffic = traffic_per_reply(records)
        if traffic:
            up.append(traffic[0])
            down.append(traffic[1])
    rows = comparison.rows
    by_federated = sorted((r for r in rows if r.get("f1_federated") is not None), key=lambda r: r["f1_federated"])
    kept = sum(1 for r in rows if None not in (r.get("f1_federated"), r.get("f1_local"))
               and r["f1_federated"] >= r["f1_local"] - 0.01)
    per_seed = {d.parent.name: {c: json.loads((d / "report" / SUMMARY_NAME).read_text()).get(f"mean_f1_{c}")
                                for c in COLUMNS} for d in run_dirs}
    return {"seeds": len(run_dirs), "districts": len(rows), "per_seed": per_seed,
            "rounds_per_seed": dict(zip((d.parent.name for d in run_dirs), rounds)),
            **{f"f1_{c}": interval(f"mean_f1_{c}") for c in COLUMNS},
            "rounds": mean_interval(rounds), "stop_rules": stop_rules, "shared_bytes_per_client_round": shared[0],
            "bytes_up_per_client_round": sum(up) / len(up) if up else None,
            "bytes_down_per_client_round": sum(down) / len(down) if down else None,
            "worst": by_federated[0]["district"] if by_federated else None,
            "worst_f1": by_federated[0]["f1_federated"] if by_federated else None,
            "best": by_federated[-1]["district"] if by_federated else None,
            "best_f1": by_federated[-1]["f1_federated"] if by_federated else None,
            "federated_ge_local_minus_0.01": kept,
            "wall_seconds": [json.loads((d / "cell.json").read_text())["wall_seconds"]
                             for d in run_dirs if (d / "cell.json").is_file()],
            # what the cell ran under (None: a cell from before cell.json recorded it)
            "settings": {d.parent.name: json.loads((d / "cell.json").read_text()).get("settings")
                         for d in run_dirs if (d / "cell.json").is_file()}}


def _f1(value) -> str:
    return "–" if value is None else f"{value:.3f}"


BASE_CELL = cell_name("shared", 0.0)   # the study's FedAvg, what every other cell is compared with


def paired(results: dict) -> dict:
    """Per cell against the base cell on the seeds both finished (mean with a 95 % t interval over seeds): the
    federated F1 and the personalised F1 against the base's federated, the federated and the personalised F1
    against the same seed's centralised model, and the ratio of rounds to the stop rule."""
    base = results.get(BASE_CELL)
    if base is None:
        return {}
    out = {}
    for name, facts in results.items():
        seeds = [seed for seed in facts["per_seed"] if seed in base["per_seed"]]
        if name == BASE_CELL or not seeds:
            continue
        mine, theirs = facts["per_seed"], base["per_seed"]

        def diffs(column: str, against: dict, against_column: str) -> dict:
            values = [mine[seed][column] - against[seed][against_column] for seed in seeds
                      if None not in (mine[seed][column], against[seed][against_column])]
            return {**mean_interval(values), "per_seed": values}

        ratios = [facts["rounds_per_seed"][seed] / base["rounds_per_seed"][seed] for seed in seeds
                  if facts["rounds_per_seed"].get(seed) and base["rounds_per_seed"].get(seed)]
        out[name] = {"seeds": seeds, "federated_minus_base": diffs("federated", theirs, "federated"),
                     "personalised_minus_base": diffs("personalised", theirs, "federated"),
                     "federated_minus_centralised": diffs("federated", mine, "centralised"),
                     "personalised_minus_centralised": diffs("personalised", mine, "centralised"),
                     "rounds_ratio": {**mean_interval(ratios), "per_seed": ratios}}
    return out


def _diff(value: dict) -> str:
    """The paired difference with its per-seed values."""
    if value.get("mean") is None:
        return "–"
    return f"{difference_text(value)} ({', '.join(f'{v:+.3f}' for v in value['per_seed'])})"


def paired_table(comparisons: dict) -> str:
    lines = [f"| cell vs {BASE_CELL} (paired by seed) | seeds | federated − base federated | "
             "personalised − base federated | federated − centralised | personalised − centralised | "
             "rounds / base rounds |",
             "|---|---|---|---|---|---|---|"]
    for name, facts in comparisons.items():
        ratio = facts["rounds_ratio"]
        shown = "–" if ratio.get("mean") is None else f"{ratio['mean']:.2f} (" + ", ".join(
            f"{v:.2f}" for v in ratio["per_seed"]) + ")"
        lines.append(f"| {name} | {len(facts['seeds'])} | {_diff(facts['federated_minus_base'])} | "
                     f"{_diff(facts['personalised_minus_base'])} | {_diff(facts['federated_minus_centralised'])} | "
                     f"{_diff(facts['personalised_minus_centralised'])} | "
                     f"{shown} |")
    return "\n".join(lines) + "\n"


def table(results: dict) -> str:
    lines = ["| cell | seeds | local | federated | personalised | centralised | rounds | MB up / down per client-round "
             "| worst (fed F1) | best (fed F1) | fed >= local - 0.01 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, facts in results.items():
        up, down = facts.get("bytes_up_per_client_round"), facts.get("bytes_down_per_client_round")
        traffic = "–" if up is None else f"{up / 1e6:.3f} / {down / 1e6:.3f}"
        lines.append(
            f"| {name} | {facts['seeds']} | "
            + "".join(f"{interval_text(facts[f'f1_{column}'])} | " for column in COLUMNS)
            + f"{interval_text(facts['rounds'], 1)} | "
            f"{traffic} | {facts['worst']} ({_f1(facts['worst_f1'])}) | "
            f"{facts['best']} ({_f1(facts['best_f1'])}) | {facts['federated_ge_local_minus_0.01']}/"
            f"{facts['districts']} |")
    return "\n".join(lines) + "\n"


def holdout_table(results: dict) -> str:
    lines = ["| cell | seeds | held-out local | global | global + AdaBN | gain (95 % CI) | up |",
             "|---|---|---|---|---|---|---|"]
    for name, facts in results.items():
        lines.append(f"| {name} | {facts['seeds']} | {interval_text(facts['f1_local'])} | "
                     f"{interval_text(facts['f1_global'])} | {interval_text(facts['f1_adapted'])} | "
                     f"{difference_text(facts['gain'])} | {facts['improved']}/{facts['pairs']} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> Path | None:
    """noniid.png: each cell's mean test F1 per column, with the 95 % interval over seeds as whiskers."""
    from nfed.report.plots import bar_chart

    if not results:
        return None
    names = list(results)
    series = {column: [results[n][f"f1_{column}"].get("mean") for n in names] for column in COLUMNS}
    whiskers = {column: [None if results[n][f"f1_{column}"].get("low") is None else
                         (results[n][f"f1_{column}"]["low"], results[n][f"f1_{column}"]["high"]) for n in names]
                for column in COLUMNS}
    seeds = sorted({results[n]["seeds"] for n in names})
    # the seed count goes into the title when every cell has the same (long labels are cut at the figure's foot)
    labels = names if len(seeds) == 1 else [f"{n} ({results[n]['seeds']} seeds)" for n in names]
    return bar_chart(path, labels, series, whiskers=whiskers,
                     title=f"Districts that differ: mean test F1 over 25 districts ({'/'.join(map(str, seeds))} "
                           "seeds, 95 % intervals)", y_label="mean test F1", y_max=1.0)


def write_outputs(out: Path, settings: DemoSettings, results: dict, held_results: dict) -> str:
    """noniid.json, noniid.md and noniid.png from the cells' facts; the markdown is returned."""
    comparisons = paired(results)
    write_json_atomic(out / "noniid.json", {"call_settings": settings.to_dict(), "cells": results,
                                            "paired_with_base": comparisons,
                                            **({"held_out": held_results} if held_results else {})})
    text = (table(results) + (f"\n{paired_table(comparisons)}" if comparisons else "")
            + (f"\n{holdout_table(held_results)}" if held_results else ""))
    write_text_atomic(out / "noniid.md", text)
    figure(results, out / "noniid.png")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["shared", "fedbn", "silobn"],
                        choices=["shared", "fedbn", "silobn"])
    parser.add_argument("--prox-mu", type=float, nargs="+", default=[0.0])
    parser.add_argument("--hold-out-grid", action="store_true",
                        help=f"add a cell per seed and policy with {HOLD_OUT} districts held out together (AdaBN "
                             "before/after vs local)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: the table, JSON and figure of the cells finished so far")
    parser.add_argument("--compress", nargs="+", default=["none"], choices=COMPRESS_MODES,
                        help="add a cell per policy and mode other than none: the clients' updates compressed "
                             "(federation only, the seed's local and centralised columns reused)")
    parser.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set a field of the federation's protocol ({', '.join(PROTOCOL)}); repeatable")
    parser.add_argument("--test", action="store_true", help="3 districts at a tiny scale (checks the script)")
    args = parser.parse_args(argv)
    settings = DemoSettings(quiet=True)
    if args.test:
        settings = replace(settings, districts="Gangnam-gu,Jung-gu,Nowon-gu", max_rounds=4, warmup_rounds=1,
                           val_tiles=2, test_tiles=2, epochs=3, scale=0.002)
    settings = protocol_settings(settings, args.protocol)
    grid = [(policy, mu) for mu in args.prox_mu for policy in args.policies]
    if ("shared", 0.0) in grid:   # the study's method first: the other cells reuse its local and centralised
        grid.remove(("shared", 0.0))
        grid.insert(0, ("shared", 0.0))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def echo(text: str) -> None:
        print(text, flush=True)

    if args.table_only:
        packs = find_packs(out / "packs") if (out / "packs").is_dir() else {}
    else:
        packs = find_packs(out / "packs") if (out / "packs").is_dir() else make_data(out, settings, echo)
    runs: dict[str, list[Path]] = {}
    held: dict[str, list[Path]] = {}
    results: dict[str, dict] = {}
    held_results: dict[str, dict] = {}
    text = ""
    for seed in args.seeds:
        base = None
        hold_out = held_out_districts(list(packs), seed) if args.hold_out_grid and packs else ()
        cells = ([(p, m, (), "none") for p, m in grid]
                 + [(p, 0.0, (), c) for p in args.policies for c in args.compress if c != "none"]
                 + [(p, 0.0, hold_out, "none") for p in args.policies if hold_out])
        for policy, mu, held_out, compress in cells:
            name = cell_name(policy, mu, len(held_out), compress)
            if args.table_only:
                run_dir = out / f"seed-{seed}" / name
                if not (run_dir / "report" / "summary.json").is_file():
                    echo(f"[noniid] seed {seed} {name}: not finished, left out of the table")
                    continue
            else:
                run_dir = run_cell(out, packs, settings, seed, policy, mu, base, echo, held_out, compress)
                base = base or run_dir
            (held if held_out else runs).setdefault(name, []).append(run_dir)
            if held_out:   # only the cell that changed is summarised again
                held_results[name] = holdout_facts(held[name])
            else:
                results[name] = cell_facts(runs[name])
            text = write_outputs(out, settings, results, held_results)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
