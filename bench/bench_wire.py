"""Bytes on the wire against F1 (issue 26): `nfed federate` under its defaults with each update encoding and broadcast.

    python bench/bench_wire.py --out DIR --levir ../shared/data/levir-cd-samples [--seeds 0 1 2]
    python bench/bench_wire.py --out DIR --packs PACKS [--cells none/fp32 int8-ef/fp32 ...] [--table-only]

A cell is `--compress C --broadcast B` (written C/B). Each cell and seed is `nfed federate --data PACKS --out
DIR/seed-S/C-B --seed S --compress C --broadcast B`, run as a user runs it (a subprocess with one BLAS thread, so
that runs beside other work stay comparable), and skipped when it finished before. --levir packs the real LEVIR-CD
sample tiles into 3 pseudo-districts (DIR/levir-data, as bench_selection.py). DIR/wire.json, wire.md and wire.png:
per cell the MB each district sent and received per round (after encoding, from rounds.jsonl), the rounds to the
stop rule, the mean test F1 over districts per seed with its 95 % t interval, and the difference to none/fp32
paired by seed (issue 26's goal for int8-ef: within 0.005). The demo's 25 districts are measured by
`bench_noniid.py --compress`, which reuses their local and centralised columns.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from federation_grid import difference_text, interval_text, levir_packs, traffic_per_reply   # noqa: E402

from nfed.common.atomic import write_json_atomic, write_text_atomic
from nfed.federation.compression import BROADCAST_MODES, COMPRESS_MODES
from nfed.report.stats import mean_interval
from nfed.runs.results import read_results
from nfed.runs.runfolder import ROUNDS_NAME, SUMMARY_NAME, read_rounds

CELLS = ("none/fp32", "fp16/fp32", "int8/fp32", "int8-ef/fp32", "none/fp16")
BASE = "none/fp32"


def parse_cell(text: str) -> tuple[str, str]:
    compress, _, broadcast = text.partition("/")
    if compress not in COMPRESS_MODES or broadcast not in BROADCAST_MODES:
        raise SystemExit(f"cell {text!r}: expected COMPRESS/BROADCAST with COMPRESS one of {', '.join(COMPRESS_MODES)}"
                         f" and BROADCAST one of {', '.join(BROADCAST_MODES)}")
    return compress, broadcast


def run_dir(out: Path, seed: int, cell: str) -> Path:
    return out / f"seed-{seed}" / cell.replace("/", "-")


TEST_ARGS = ("--rounds", "2", "--warmup-rounds", "0", "--width", "4")   # --test: checks the script, measures nothing


def run(packs: Path, out: Path, seed: int, cell: str, extra: tuple[str, ...] = ()) -> None:
    """One federation, through the command line; a failure stops the bench with the command's last words."""
    folder = run_dir(out, seed, cell)
    if (folder / SUMMARY_NAME).is_file():
        print(f"[wire] seed {seed} {cell}: finished before, kept", flush=True)
        return
    compress, broadcast = parse_cell(cell)
    command = [sys.executable, "-c", "from nfed.cli import main; main()", "federate", "--data", str(packs),
               "--out", str(folder), "--seed", str(seed), "--compress", compress, "--broadcast", broadcast,
               "--overwrite", *extra]
    print(f"[wire] seed {seed} {cell}: nfed {' '.join(command[3:])}", flush=True)
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[wire] seed {seed} {cell} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    print("  " + done.stdout.strip().splitlines()[-1], flush=True)


def cell_facts(out: Path, seeds: list[int], cell: str) -> dict | None:
    """F1, rounds and traffic of one cell over the seeds it finished (None: none yet)."""
    f1, rounds, up, down = {}, {}, [], []
    for seed in seeds:
        folder = run_dir(out, seed, cell)
        if not (folder / SUMMARY_NAME).is_file():
            continue
        rows = read_results(folder / "federated.csv")
        f1[seed] = sum(row["f1"] for row in rows.values()) / len(rows)
        rounds[seed] = json.loads((folder / SUMMARY_NAME).read_text())["rounds"]
        sent, received = traffic_per_reply(read_rounds(folder / ROUNDS_NAME)) or (0.0, 0.0)
        up.append(sent)
        down.append(received)
    if not f1:
        return None
    return {"seeds": sorted(f1), "f1_per_seed": f1, "f1": mean_interval(list(f1.values())), "rounds_per_seed": rounds,
            "mb_up_per_client_round": sum(up) / len(up) / 1e6, "mb_down_per_client_round": sum(down) / len(down) / 1e6}


def paired(facts: dict, base: dict) -> dict:
    seeds = [s for s in facts["seeds"] if s in base["f1_per_seed"]]
    diffs = [facts["f1_per_seed"][s] - base["f1_per_seed"][s] for s in seeds]
    return {**mean_interval(diffs), "per_seed": diffs, "seeds": seeds}


def write_outputs(out: Path, results: dict) -> str:
    base = results.get(BASE)
    lines = ["| updates / broadcast | seeds | MB up / down per district-round | rounds | test F1 per seed | "
             "mean ± 95 % | paired − none/fp32 [95 % t] |", "|---|---:|---:|---|---|---:|---|"]
    for cell, facts in results.items():
        diff = "–"
        if base is not None and cell != BASE:
            facts["paired_with_base"] = paired(facts, base)
            diff = difference_text(facts["paired_with_base"])
        lines.append(f"| {cell} | {len(facts['seeds'])} | {facts['mb_up_per_client_round']:.3f} / "
                     f"{facts['mb_down_per_client_round']:.3f} | "
                     f"{', '.join(str(facts['rounds_per_seed'][s]) for s in facts['seeds'])} | "
                     f"{', '.join(format(facts['f1_per_seed'][s], '.3f') for s in facts['seeds'])} | "
                     f"{interval_text(facts['f1'])} | {diff} |")
    text = "\n".join(lines) + "\n"
    write_json_atomic(out / "wire.json", results)
    write_text_atomic(out / "wire.md", text)
    if results:
        from nfed.report.plots import bar_chart

        cells = list(results)
        up = {"MB up per district-round": [results[c]["mb_up_per_client_round"] for c in cells]}
        bar_chart(out / "wire.png", cells, {"mean test F1": [results[c]["f1"]["mean"] for c in cells]},
                  points=up, points_label="MB up per district-round (dots)",
                  whiskers={"mean test F1": [None if results[c]["f1"].get("low") is None else
                                             (results[c]["f1"]["low"], results[c]["f1"]["high"]) for c in cells]},
                  title="Bytes on the wire: mean test F1 per update / broadcast encoding (95 % intervals over seeds)",
                  y_label="mean test F1", y_max=1.0)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--packs", type=Path, help="a folder of district packs")
    source.add_argument("--levir", type=Path, help="LEVIR-CD folder (A/, B/, label/) packed into 3 pseudo-districts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="COMPRESS/BROADCAST pairs")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the outputs of the finished runs")
    parser.add_argument("--test", action="store_true", help="2 rounds at width 4 per run (checks the script)")
    args = parser.parse_args(argv)
    for cell in args.cells:
        parse_cell(cell)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        if args.packs is None and args.levir is None:
            raise SystemExit("give --packs or --levir (or --table-only)")
        packs = args.packs or next(iter(levir_packs(args.out, args.levir).values())).parent
        for seed in args.seeds:
            for cell in args.cells:
                run(packs, args.out, seed, cell, TEST_ARGS if args.test else ())
    results = {cell: facts for cell in args.cells if (facts := cell_facts(args.out, args.seeds, cell)) is not None}
    print(write_outputs(args.out, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
