"""Round trip of W-Net-CD's weights through a real Flower deployment on loopback (issue 7, item 4).

Starts a SuperLink and one SuperNode on 127.0.0.1 (tests/flower_harness.py), then a ServerApp sends the full
state of a W-Net-CD of the given width to the node, packed by nfed.federation.flower.messages' weights_to_record,
and the ClientApp decodes it and sends it back re-encoded, as a client's update travels. The apps are
nfed.benchmarks.transfer's (`nfed bench transfer` times the serialisation and a plain HTTP copy of the same bytes
alone, and so does the ServerApp here, on the same machine); this script starts the deployment. The server checks
the returned arrays are bit-identical and reports, per repeat, the round-trip time of the
weights message against an empty message and against the reference layout (one Array per parameter name,
the plain ArrayRecord way) in the same run (the SuperNode's 3 s polling and the ClientApp
process start are in both, so the difference is the cost of moving the bytes), plus peak memory (max RSS)
of the ServerApp and the ClientApp process. The same round trip compressed (issue 26): the model broadcast in
float16 (--broadcast fp16) and an update sent back as an int8 delta (--compress int8), decoded and checked by the
server, with the bytes each way.

    .venv/bin/python bench/bench_flower_transfer.py --width 64 --repeats 2      # the study's 67.3M params
    .venv/bin/python bench/bench_flower_transfer.py --width 8 --repeats 1       # quick look

Flower 1.42 moves each Array as 5 MB chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one HTTP object each, so
no message-size limit is hit whatever the model size; the report lists the chunk count.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nfed.benchmarks.transfer import flower_apps

REPO = Path(__file__).resolve().parents[1]

APPS = flower_apps()   # the engine: nfed/benchmarks/transfer.py
server_app = APPS[0]   # plain assignments: Flower finds the app's objects by reading this file
client_app = APPS[1]


APP_TOML = """[project]
name = "nfed-flower-transfer-bench"
version = "1.0.0"
description = "round trip of W-Net-CD weights through Flower"
license = "MIT"

[tool.flwr.app]
publisher = "nfed"

[tool.flwr.app.components]
serverapp = "bench_flower_transfer:server_app"
clientapp = "bench_flower_transfer:client_app"

[tool.flwr.app.config]
width = 64
repeats = 2
out = ""
"""


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident memory) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="W-Net-CD base width (64: the study's model)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from flower_harness import FlowerDeployment

    with tempfile.TemporaryDirectory(prefix="nfed-flower-bench-") as tmp:
        work = Path(tmp)
        app = work / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_TOML)
        out = work / "summary.json"
        with FlowerDeployment(work / "flower", python_path=[REPO / "bench"]) as flower:
            flower.start_superlink()
            flower.start_supernodes({"echo": {"pack": "none"}})
            result = flower.run_app(app, run_config={"width": args.width, "repeats": args.repeats,
                                                     "out": str(out)},
                                    timeout=args.timeout, on_line=lambda line: print(line, end="", flush=True))
            if result.returncode != 0 or not out.exists():
                print(flower.logs(), file=sys.stderr)
                return 1
            summary = json.loads(out.read_text())
            summary["superlink_peak_rss_mb"] = _peak_rss_mb(flower.superlink.pid)
            summary["supernode_peak_rss_mb"] = _peak_rss_mb(flower.supernodes["echo"].pid)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"W-Net-CD w={summary['width']}: {summary['parameters']:,} parameters, {summary['megabytes']:.1f} MB "
          f"({summary['chunks_each_way']} chunks of <= 5 MB each way); best round trip "
          f"{summary['best_weights_round_trip_s']:.1f} s, of which {summary['best_transfer_s']:.1f} s moving "
          f"the weights ({summary['megabytes_per_s_both_ways']:.0f} MB/s both ways); one Array per name instead: "
          f"{summary['best_per_name_round_trip_s']:.1f} s "
          f"(x{summary['best_per_name_round_trip_s'] / summary['best_weights_round_trip_s']:.2f}); peak RSS "
          f"{summary['server_max_rss_mb']:.0f} MB (ServerApp), "
          f"{max(r['client_max_rss_mb'] for r in summary['repeats']):.0f} MB "
          f"(ClientApp), {summary['superlink_peak_rss_mb']} MB (SuperLink), {summary['supernode_peak_rss_mb']} MB "
          f"(SuperNode); fp16 down + int8 up: {summary['best_compressed_round_trip_s']:.1f} s for "
          f"{(summary['repeats'][0]['compressed_bytes_down'] + summary['repeats'][0]['compressed_bytes_up']) / 1e6:.1f}"
          f" MB; plain HTTP copy of the same bytes {summary['http_mb_per_s_both_ways']:.0f} MB/s both ways")
    return 0


if __name__ == "__main__":
    sys.exit(main())
