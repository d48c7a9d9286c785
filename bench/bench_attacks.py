"""Robust aggregation under simulated attacks: mean federated test F1 for aggregator x attack x attackers.

Every cell is one federation of the demo's 25 districts (`nfed federate --aggregator A --simulate-attack K
--attackers N`, seeded attackers); a cell with 0 attackers is the aggregator's clean run, shared by every
attack. The score is the mean test F1 over the districts of the final global model (no best-round choice,
rounds are not evaluated: the aggregate alone is measured). Writes OUT/attacks.json (kept as cells finish, so
an interrupted bench resumes), OUT/attacks.md (table and the goals checked) and OUT/attacks.png.

    python bench/bench_attacks.py --out /tmp/nfed-attacks [--rounds 6] [--width 4 --tile 32]
        [--aggregators fedavg,median,...] [--attacks sign-flip,...] [--attackers 0,1,3,5]

A full demo-size grid (width 8, tile 64, 28 rounds) is out of reach on 2 CPU cores: size it with the options
and report what ran.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from federation_grid import Grid, prepare_packs, size_arguments, size_record, train_config  # noqa: E402

AGGREGATORS = ("fedavg", "median", "trimmed-mean", "multi-krum", "clipped")
ATTACKS = ("sign-flip", "noise", "scaled", "label-flip", "sample-inflation")
GOAL_ATTACKS = ("sign-flip", "scaled", "noise")
ROBUST_WITHIN = 0.03    # robust aggregator under 5/25 attackers vs its own clean run
CLEAN_WITHIN = 0.02     # clean robust run vs clean FedAvg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser, rounds=6)
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--attackers", default="0,1,3,5", help="attacker counts (0: the clean run)")
    parser.add_argument("--trim-beta", type=float, default=0.2)
    parser.add_argument("--krum-f", type=int, default=None, help="default: the largest attacker count")
    parser.add_argument("--clip-factor", type=float, default=1.0)
    parser.add_argument("--max-sample-share", type=float, default=1.0)
    args = parser.parse_args(argv)

    from nfed.federation.config import FederationConfig

    args.out.mkdir(parents=True, exist_ok=True)
    aggregators = [a for a in args.aggregators.split(",") if a]
    attacks = [a for a in args.attacks.split(",") if a]
    counts = sorted({int(n) for n in args.attackers.split(",") if n})
    krum_f = args.krum_f if args.krum_f is not None else max(counts)
    packs = prepare_packs(args)
    config = train_config(args)
    size = {**size_record(args), "districts": len(packs), "trim_beta": args.trim_beta, "krum_f": krum_f,
            "clip_factor": args.clip_factor, "max_sample_share": args.max_sample_share}
    grid = Grid(args.out / (f"attacks-{args.part}.json" if args.part else "attacks.json"), size, args.fresh,
                args.table_only)

    def cell(aggregator, attack, attackers):
        key = f"{aggregator}/clean" if attackers == 0 else f"{aggregator}/{attack}/{attackers}"
        fed = FederationConfig(rounds=args.rounds, local_epochs=args.local_epochs, eps=0.0, seed=args.seed,
                               aggregator=aggregator, trim_beta=args.trim_beta, krum_f=krum_f,
                               clip_factor=args.clip_factor, max_sample_share=args.max_sample_share,
                               simulate_attack=attack if attackers else None, attackers=attackers,
                               evaluate_rounds=False)
        return grid.run(key, packs, config, fed, args.out / "runs" / key.replace("/", "_"))

    table, losses = {}, {}
    for attackers in counts:   # clean runs first, then every aggregator at 1, 3, 5 attackers
        for attack in attacks if attackers else attacks[:1]:
            for aggregator in aggregators:
                result = cell(aggregator, attack, attackers)
                if result is None:   # --table-only and not run yet
                    continue
                for kind in attacks if attackers == 0 else [attack]:
                    table[(aggregator, kind, attackers)] = result["mean_test_f1"]
                    losses[(aggregator, kind, attackers)] = result.get("mean_test_loss")
    write_outputs(args.out, table, losses, aggregators, attacks, counts, size)
    return 0


def goals(table, aggregators, attacks, counts) -> list[str]:
    """The issue's goals, each measured (lines for the table's notes)."""
    lines = []
    top = max(counts)
    clean_fedavg = table.get(("fedavg", attacks[0], 0))
    for aggregator in aggregators:
        clean = table.get((aggregator, attacks[0], 0))
        if aggregator != "fedavg" and clean is not None and clean_fedavg is not None:
            gap = clean - clean_fedavg
            lines.append(f"clean {aggregator} vs clean fedavg: {gap:+.4f} "
                         f"({'met' if abs(gap) <= CLEAN_WITHIN else 'MISSED'}, goal within {CLEAN_WITHIN})")
        for attack in attacks:
            hit = table.get((aggregator, attack, top))
            if hit is None or clean is None:
                continue
            drop = hit - clean
            if aggregator == "fedavg":
                lines.append(f"fedavg, {top} x {attack}: {drop:+.4f} vs its clean run")
            elif attack in GOAL_ATTACKS:
                lines.append(f"{aggregator}, {top} x {attack}: {drop:+.4f} vs its clean run "
                             f"({'met' if drop >= -ROBUST_WITHIN else 'MISSED'}, goal >= -{ROBUST_WITHIN})")
            else:
                lines.append(f"{aggregator}, {top} x {attack}: {drop:+.4f} vs its clean run (reported)")
    return lines


def write_outputs(out: Path, table, losses, aggregators, attacks, counts, size) -> None:
    from nfed.report.plots import line_chart

    header = "| aggregator | attack | " + " | ".join(f"{n} attackers" for n in counts) + " |"
    lines = [f"Mean test F1 (mean test loss) of the final global model ({size['districts']} districts; "
             f"size {size})", "", header, "|" + "---|" * (len(counts) + 2)]
    for aggregator in aggregators:
        for attack in attacks:
            cells = [(table.get((aggregator, attack, n)), losses.get((aggregator, attack, n))) for n in counts]
            if all(f1 is None for f1, _ in cells[1:]):
                continue   # only the clean run so far
            lines.append(f"| {aggregator} | {attack} | " + " | ".join(
                "" if f1 is None else f"{f1:.4f}" + ("" if loss is None else f" ({loss:.3g})") for f1, loss in cells)
                + " |")
    lines += ["", *[f"- {line}" for line in goals(table, aggregators, attacks, counts)]]
    (out / "attacks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    panels = []
    for attack in attacks:
        series = {aggregator: [table.get((aggregator, attack, n)) for n in counts] for aggregator in aggregators}
        if any(v is not None and math.isfinite(v) for vs in series.values() for v in vs):
            panels.append(line_chart(out / f"attacks_{attack}.png", counts, series,
                                     title=f"{attack}: mean test F1 vs attackers",
                                     x_label=f"attackers of {size['districts']}", y_label="mean test F1"))
    if panels:
        stitch(panels, out / "attacks.png")


def stitch(paths, target: Path, columns: int = 2) -> None:
    """One figure of the per-attack panels, `columns` wide."""
    from PIL import Image

    images = [Image.open(path) for path in paths]
    width, height = max(i.width for i in images), max(i.height for i in images)
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (width * min(columns, len(images)), height * rows), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    sheet.save(target)


if __name__ == "__main__":
    sys.exit(main())
