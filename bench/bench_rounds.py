"""Rounds to a target F1: FedAvg against FedAvgM (server momentum) and FedAdam on the demo study.

The study names "fewer rounds" as future work. This bench runs the same federation (same packs, seed, client
set-up) once per server optimiser and reports, for each, the first round whose global model reaches the
target mean validation F1 over the districts, the best mean F1 and the wall time. It is slow (every run is a
full federation on CPU); it is a bench, not a test.

    python bench/bench_rounds.py --out /tmp/nfed-rounds [--data PACKS] [--rounds 15] [--target 0.6]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RUNS = {  # name -> (server optimiser, server lr)
    "fedavg": ("fedavg", 1.0),
    "fedavgm": ("fedavgm", 1.0),
    "fedadam": ("fedadam", 0.01),
}


def prepare_packs(out: Path, scale: float, seed: int) -> Path:
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise
    from nfed.training.trainer import PROFILE_TILES

    packs = out / "packs"
    if not any(packs.glob("*.h5")):
        synthesise(out / "synth", scale=scale, tile=PROFILE_TILES["demo"], seed=seed)
        pack_folder(out / "synth", packs, seed=seed)
    return packs


def rounds_to_target(rounds: list[dict], target: float) -> int | None:
    for record in rounds:
        if (record.get("mean_val_f1") or 0.0) >= target:
            return record["round"]
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (packs and one run per optimiser)")
    parser.add_argument("--data", type=Path, help="existing packs folder (default: synthesise the demo study)")
    parser.add_argument("--scale", type=float, default=0.025)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.6, help="target mean validation F1 of the global model")
    parser.add_argument("--momentum", type=float, default=0.9, help="FedAvgM server momentum")
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--test", action="store_true", help="also evaluate each final model on the test splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate
    from nfed.runs.packs import find_packs
    from nfed.training.environment import RunEnvironment
    from nfed.training.trainer import profile_config

    args.out.mkdir(parents=True, exist_ok=True)
    packs = find_packs(args.data or prepare_packs(args.out, args.scale, args.seed))
    config = profile_config("demo", seed=args.seed)
    env = RunEnvironment.from_options(args.device)
    results = {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        server_opt, server_lr = RUNS[name]
        fed = FederationConfig(rounds=args.rounds, local_epochs=args.local_epochs, server_opt=server_opt,
                               server_lr=server_lr, server_momentum=args.momentum, seed=args.seed)
        started = time.perf_counter()
        result = federate(packs, args.out / f"run-{name}", config, fed, evaluate_test=args.test, overwrite=True,
                          echo=lambda line: print(f"  [{name}] {line}", file=sys.stderr), env=env)
        curve = [r.get("mean_val_f1") for r in result.rounds]
        test_f1 = [row["f1"] for row in result.results]
        results[name] = {"rounds_to_target": rounds_to_target(result.rounds, args.target),
                         "best_mean_val_f1": max((f for f in curve if f is not None), default=None),
                         "final_mean_val_f1": curve[-1] if curve else None, "curve": curve,
                         "mean_test_f1": sum(test_f1) / len(test_f1) if test_f1 else None,
                         "seconds": round(time.perf_counter() - started, 1)}
    print(f"rounds to mean validation F1 >= {args.target} ({len(packs)} districts, {args.rounds} rounds max, "
          f"{args.local_epochs} local epoch(s)):")
    print(f"{'server opt':<10} {'rounds':>7} {'best F1':>8} {'final F1':>9} {'seconds':>8}")
    for name, r in results.items():
        reached = r["rounds_to_target"] if r["rounds_to_target"] is not None else f">{args.rounds}"
        print(f"{name:<10} {reached:>7} {r['best_mean_val_f1'] or 0:>8.4f} {r['final_mean_val_f1'] or 0:>9.4f} "
              f"{r['seconds']:>8.1f}")
    (args.out / "bench_rounds.json").write_text(json.dumps({"target": args.target, "rounds": args.rounds,
                                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
