"""Throughput of `nfed synth` (tiles/s at a given tile size): drawing alone, and with PNG/JSON output
in one process and in one process per CPU.

Reports wall-clock tiles/s and CPU-time tiles/s (process CPU of all threads): on a shared machine the
second is the fairer number, the first is what a user waits for. Also the peak resident memory.

    .venv/bin/python bench/bench_synth.py --tiles 500 --tile 64
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from nfed.data import synth
from nfed.data.districts import load_districts
from nfed.data.synthscene import generate_tile
from nfed.data.synthstyle import district_style


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=500, help="tiles per measurement (spread over districts)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="best of N")
    args = parser.parse_args()
    districts = load_districts()
    per_district = max(1, args.tiles // len(districts))
    tiles = per_district * len(districts)

    def draw_only():
        for district in districts:
            style = district_style(district.name, 0)
            for index in range(per_district):
                generate_tile(style, synth.tile_rng(0, district.name, index), args.tile)

    def with_files(jobs):
        def run():
            with tempfile.TemporaryDirectory(dir=os.environ.get("NFED_BENCH_DIR")) as out:
                synth.synthesise(Path(out), scale=1e-9, tile=args.tile, seed=0, min_per_district=per_district,
                                 jobs=jobs)
        return run

    print(f"nfed synth benchmark: {tiles} tiles of {args.tile}x{args.tile}, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    jobs = synth.default_jobs()
    for name, function in (("draw only", draw_only), ("synth, 1 process", with_files(1)),
                           (f"synth, {jobs} processes", with_files(jobs))):
        runs = [measure(function) for _ in range(args.repeat)]
        wall = min(r[0] for r in runs)
        cpu = min(r[1] for r in runs)
        print(f"  {name:20s} {tiles / wall:7.0f} tiles/s wall   {tiles / cpu:7.0f} tiles/s per CPU-second")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"  peak resident memory {peak_mib:.0f} MiB (largest worker {worker_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
