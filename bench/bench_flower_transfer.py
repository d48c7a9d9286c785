"""Round trip of W-Net-CD's weights through a real Flower deployment on loopback (issue 7, item 4).

Starts a SuperLink and one SuperNode on 127.0.0.1 (tests/flower_harness.py), then a ServerApp (defined in
this file) sends the full state of a W-Net-CD of the given width to the node, packed by nfed.federation.flower's
weights_to_record, and the ClientApp decodes it and sends it back re-encoded, as a client's update travels.
The server checks the returned arrays are bit-identical and reports, per repeat, the round-trip time of the
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
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from nfed.federation.compression import broadcast, decode, encode, received
from nfed.federation.flower_exchange import exchange
from nfed.federation.flower_messages import (record_bytes, record_to_update, record_to_weights, update_to_record,
                                             weights_to_record)

REPO = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 5 * 1024 * 1024

server_app = ServerApp()
client_app = ClientApp()


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@client_app.query()
def echo(message: Message, context: Context) -> Message:
    """Decode the weights (if any) and send them back re-encoded, with this process's peak memory."""
    started = time.perf_counter()
    content = RecordDict()
    if "weights" in message.content:
        content["weights"] = weights_to_record(record_to_weights(message.content["weights"]))
    if "compressed" in message.content:   # a float16 broadcast in, an int8 delta (a small update) back
        start = received(record_to_weights(message.content["compressed"]))
        rng = np.random.default_rng(1)
        delta = {name: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for name, v in start.items()}
        content["compressed"] = update_to_record(encode(delta, "int8"))
    if "per_name" in message.content:  # the reference layout: one Array per parameter name
        content["per_name"] = _per_name_record(_from_per_name(message.content["per_name"]))
    content["info"] = ConfigRecord({"client_seconds": time.perf_counter() - started,
                                    "client_max_rss_mb": _max_rss_mb()})
    return Message(content, reply_to=message)


def _per_name_record(weights) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in weights.items():
        record[name] = Array(np.asarray(value, order="C"))
    return record


def _from_per_name(record) -> dict:
    return {name: array.numpy() for name, array in record.items()}


def _round_trip(grid: Grid, node: int, content: RecordDict, label: str):
    message = Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id=label)
    started = time.perf_counter()
    reply = exchange(grid, {label: message}, timeout=1800)[label]
    seconds = time.perf_counter() - started
    if reply.message is None or reply.error is not None:
        raise RuntimeError(f"{label}: no reply ({reply.error or reply.silence(node, 1800)})")
    return reply.message, seconds


@server_app.main()
def bench_main(grid: Grid, context: Context) -> None:
    from nfed.federation.client import host_state
    from nfed.model.wnet import WNetCD

    config = context.run_config
    width, repeats, out = int(config["width"]), int(config["repeats"]), Path(str(config["out"]))
    deadline = time.monotonic() + 120
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.25)
    node = sorted(grid.get_node_ids())[0]

    weights = host_state(WNetCD(width=width, rng=np.random.default_rng(0)))
    parameters = sum(int(v.size) for v in weights.values())
    nbytes = sum(int(v.nbytes) for v in weights.values())
    started = time.perf_counter()
    record = weights_to_record(weights)
    encode_seconds = time.perf_counter() - started
    chunks = sum(math.ceil(len(array.data) / CHUNK_BYTES) for array in record.values())

    per_name = _per_name_record(weights)
    rows = []
    for repeat in range(repeats):
        _, empty_seconds = _round_trip(grid, node, RecordDict(), f"empty-{repeat}")
        reply, weights_seconds = _round_trip(grid, node, RecordDict({"weights": record}), f"weights-{repeat}")
        back = record_to_weights(reply.content["weights"])
        identical = list(back) == list(weights) and all(np.array_equal(back[k], v) for k, v in weights.items())
        info = reply.content["info"]
        reply, per_name_seconds = _round_trip(grid, node, RecordDict({"per_name": per_name}), f"per-name-{repeat}")
        back = _from_per_name(reply.content["per_name"])
        identical = identical and all(np.array_equal(back[k], v) for k, v in weights.items())
        down = weights_to_record(broadcast(weights, "fp16"))
        reply, compressed_seconds = _round_trip(grid, node, RecordDict({"compressed": down}), f"compressed-{repeat}")
        decode(record_to_update(reply.content["compressed"]), weights)   # checked like a client's update
        rows.append({"repeat": repeat, "empty_round_trip_s": round(empty_seconds, 3),
                     "compressed_round_trip_s": round(compressed_seconds, 3),
                     "compressed_bytes_down": record_bytes(down),
                     "compressed_bytes_up": record_bytes(reply.content["compressed"]),
                     "weights_round_trip_s": round(weights_seconds, 3),
                     "transfer_s": round(weights_seconds - empty_seconds, 3),
                     "per_name_round_trip_s": round(per_name_seconds, 3),
                     "client_decode_encode_s": round(float(info["client_seconds"]), 3),
                     "client_max_rss_mb": round(float(info["client_max_rss_mb"]), 1),
                     "identical": bool(identical)})
        print(json.dumps(rows[-1]), flush=True)
        if not identical:
            raise RuntimeError("the weights came back changed")
    summary = {"width": width, "parameters": parameters, "arrays": len(weights), "megabytes": nbytes / 1e6,
               "record_arrays": len(record), "chunks_each_way": chunks, "encode_s": round(encode_seconds, 3),
               "server_max_rss_mb": round(_max_rss_mb(), 1), "repeats": rows,
               "best_weights_round_trip_s": min(r["weights_round_trip_s"] for r in rows),
               "best_transfer_s": min(r["transfer_s"] for r in rows),
               "best_per_name_round_trip_s": min(r["per_name_round_trip_s"] for r in rows),
               "best_compressed_round_trip_s": min(r["compressed_round_trip_s"] for r in rows)}
    summary["megabytes_per_s_both_ways"] = round(2 * summary["megabytes"] / max(summary["best_transfer_s"], 1e-9), 1)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "repeats"}), flush=True)


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
          f"{summary['best_per_name_round_trip_s']:.1f} s (x{summary['best_per_name_round_trip_s'] / summary['best_weights_round_trip_s']:.2f}); peak RSS "
          f"{summary['server_max_rss_mb']:.0f} MB (ServerApp), {max(r['client_max_rss_mb'] for r in summary['repeats']):.0f} MB "
          f"(ClientApp), {summary['superlink_peak_rss_mb']} MB (SuperLink), {summary['supernode_peak_rss_mb']} MB "
          f"(SuperNode); fp16 down + int8 up: {summary['best_compressed_round_trip_s']:.1f} s for "
          f"{(summary['repeats'][0]['compressed_bytes_down'] + summary['repeats'][0]['compressed_bytes_up']) / 1e6:.1f}"
          f" MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
