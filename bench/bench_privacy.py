"""Differential privacy against utility: mean federated test F1 of DP-FedAvg at several epsilons.

For each target epsilon (at delta = 1 / the districts' training samples, every district every round) the
noise multiplier z comes from the accountant (nfed.federation.privacy.noise_for_epsilon over --rounds releases); the
clipping bound C is the median client update norm of a clean first round (measured here with a one-round
`--aggregator clipped` run) unless --dp-clip gives one. "inf" is DP-FedAvg without noise (clipping and equal
weights only); plain FedAvg is run beside it. Writes OUT/privacy.json (cells kept as they finish),
OUT/privacy.md and OUT/privacy.png.

    python bench/bench_privacy.py --out /tmp/nfed-dp [--epsilons 1,4,16,64,inf] [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from federation_grid import Grid, prepare_packs, size_arguments, size_record, train_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser, rounds=4)
    parser.add_argument("--epsilons", default="1,4,16,inf")
    parser.add_argument("--dp-clip", type=float, default=None, help="default: the median update norm of round 1")
    args = parser.parse_args(argv)

    from nfed.data.reader import DistrictPack
    from nfed.federation.config import FederationConfig
    from nfed.federation.privacy import noise_for_epsilon
    from nfed.federation.server import federate

    args.out.mkdir(parents=True, exist_ok=True)
    packs = prepare_packs(args)
    config = train_config(args)
    samples = 0
    for path in packs.values():
        with DistrictPack(path) as pack:
            samples += pack.num_samples("train")
    delta = 1.0 / samples
    clip = args.dp_clip
    if clip is None and args.table_only:
        saved = sorted(args.out.glob("privacy*.json"))
        clip = next((json.loads(path.read_text())["size"]["dp_clip"] for path in saved), None)
    if clip is None:
        probe = federate(packs, args.out / "runs" / "clip-probe", config,
                         FederationConfig(rounds=1, local_epochs=args.local_epochs, eps=0.0, seed=args.seed,
                                          aggregator="clipped", evaluate_rounds=False),
                         overwrite=True, evaluate_test=False)
        clip = float(probe.rounds[0]["aggregation"]["bound"])
    size = {**size_record(args), "districts": len(packs), "delta": delta, "dp_clip": clip}
    grid = Grid(args.out / (f"privacy-{args.part}.json" if args.part else "privacy.json"), size, args.fresh,
                args.table_only)
    base = dict(rounds=args.rounds, local_epochs=args.local_epochs, eps=0.0, seed=args.seed, evaluate_rounds=False)
    rows = [("fedavg (no DP)", None, grid.run("fedavg", packs, config, FederationConfig(**base),
                                              args.out / "runs" / "fedavg"))]
    for text in [e for e in args.epsilons.split(",") if e]:
        epsilon = float(text)
        z = 0.0 if args.table_only else noise_for_epsilon(epsilon, args.rounds, 1.0, delta)
        fed = FederationConfig(**base, dp_clip=clip, dp_noise=z, dp_delta=delta)
        cell = grid.run(f"epsilon={text}", packs, config, fed, args.out / "runs" / f"dp-{text}",
                        extra={"noise_multiplier": z})
        if cell is not None:
            rows.append((f"epsilon {text}", epsilon, cell))
    write_outputs(args.out, [row for row in rows if row[2] is not None], size)
    return 0


def write_outputs(out: Path, rows, size) -> None:
    from nfed.report.plots import line_chart

    lines = [f"DP-FedAvg: mean test F1 of the final global model against epsilon (size {size})", "",
             "| run | target epsilon | noise multiplier z | epsilon spent | mean test F1 | mean test loss |",
             "|---|---|---|---|---|---|"]
    for name, target, cell in rows:
        spent = cell.get("epsilon")
        lines.append(f"| {name} | {'' if target is None else f'{target:g}'} | {cell.get('noise_multiplier', '')} | "
                     f"{'' if spent is None else f'{spent:.3g}'} | {cell['mean_test_f1']:.4f} | "
                     f"{cell.get('mean_test_loss', float('nan')):.4f} |")
    (out / "privacy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    dp = [(target, cell["mean_test_f1"]) for _, target, cell in rows if target is not None]
    finite = sorted((t, f) for t, f in dp if math.isfinite(t))
    xs = [math.log2(t) for t, _ in finite]
    no_noise = [f for t, f in dp if math.isinf(t)]
    series = {"DP-FedAvg": [f for _, f in finite]}
    if no_noise:
        series["no noise (clipping only)"] = [no_noise[0]] * len(xs)
    series["FedAvg"] = [rows[0][2]["mean_test_f1"]] * len(xs)
    if xs:
        line_chart(out / "privacy.png", xs, series, title="DP-FedAvg: mean test F1 vs epsilon",
                   x_label="log2 epsilon", y_label="mean test F1", y_max=1.0)


if __name__ == "__main__":
    sys.exit(main())
