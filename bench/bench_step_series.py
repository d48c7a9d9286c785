"""`nfed bench step --json` run several times in a row for a few profiles: median ratios and the load.

Each run times nfed and then the PyTorch twin in fresh processes (see nfed/benchmarks/step.py), so the
runs interleave the two sides; on a shared machine the medians over runs, reported with the load average
before each run, are the numbers to quote. Usage:

    python bench/bench_step_series.py --runs 5 --profile 8/64/8 --profile 16/128/8 [--eval] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def one_run(width: int, tile: int, batch: int, inference: bool, repeat: int, threads: int | None) -> dict:
    command = [sys.executable, "-m", "nfed.cli", "bench", "step", "--json", "--width", str(width), "--tile", str(tile),
               "--batch", str(batch), "--repeat", str(repeat)] + (["--eval"] if inference else []) \
        + (["--threads", str(threads)] if threads else [])
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    result["load_before"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per run and side")
    parser.add_argument("--profile", action="append", help="width/tile/batch (default 8/64/8 and 16/128/8)")
    parser.add_argument("--eval", action="store_true", help="inference forward instead of a training step")
    parser.add_argument("--threads", type=int, help="threads for both sides (bench step --threads)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON lines too")
    args = parser.parse_args()
    profiles = [tuple(int(v) for v in p.split("/")) for p in (args.profile or ["8/64/8", "16/128/8"])]
    runs = {p: [] for p in profiles}
    for _ in range(args.runs):
        for profile in profiles:  # profiles interleaved too
            load = os.getloadavg()[0]
            result = one_run(*profile, args.eval, args.repeat, args.threads)
            result["load_before"] = load
            runs[profile].append(result)
            if args.json:
                print(json.dumps(result))
    mode = "inference forward" if args.eval else "training step"
    mode += f", {args.threads} thread(s) each" if args.threads else ""
    for (width, tile, batch), results in runs.items():
        ratios = [r["ratio"] for r in results if r.get("ratio") is not None]
        nfed = statistics.median(r["nfed_s_per_step"] for r in results)
        ref = [r["reference_s_per_step"] for r in results if r.get("reference_s_per_step") is not None]
        memory = statistics.median(r["memory_ratio"] for r in results if r.get("memory_ratio") is not None) \
            if ref else None
        loads = [round(r["load_before"], 1) for r in results]
        print(f"w{width}/{tile}/{batch} {mode}, {len(results)} runs, load averages {loads}, "
              f"{results[0].get('nfed_blas')}:")
        print(f"  nfed median {nfed:.3f} s/step"
              + (f", PyTorch median {statistics.median(ref):.3f} s/step, ratio median {statistics.median(ratios):.2f} "
                 f"(runs {[round(r, 2) for r in ratios]}), peak RSS ratio median {memory:.2f}" if ref else ""))


if __name__ == "__main__":
    main()
