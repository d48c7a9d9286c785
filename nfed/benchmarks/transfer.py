"""Where a weights round trip's time goes (issue 26, item 1): nfed's serialisation, a plain HTTP copy of the same
bytes on loopback, and (bench/bench_flower_transfer.py, which starts the deployment) the same round trip through
a Flower SuperLink and SuperNode on loopback, with the ServerApp and ClientApp defined here.

    nfed bench transfer --width 8               # serialisation and the plain HTTP copy, in seconds
    .venv/bin/python bench/bench_flower_transfer.py --width 64 --repeats 2      # + Flower, the same bytes

Serialisation is timed both ways: nfed's packing (weights_to_record: one .npy buffer per dtype written straight
from each tensor; record_to_weights: views of the received bytes, one copy per tensor or none) against the
packing it replaced (np.concatenate, np.save through Array(ndarray), Array.numpy()'s np.load, then a copy per
tensor). The plain copy is an http.server on 127.0.0.1 that echoes a POSTed body: the bytes move down and up
once, like the global model and a client's update, with no framework around them; what Flower adds above it
(its 5 MB chunks, one HTTP request each per hop, the SuperNode's poll, a ClientApp process) is Flower's share.
"""
from __future__ import annotations

import http.client
import json
import math
import resource
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

import numpy as np

CHUNK_BYTES = 5 * 1024 * 1024   # Flower 1.42's array chunk (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
LOOPBACK = "127.0.0.1"


def model_weights(width: int) -> dict[str, np.ndarray]:
    """W-Net-CD's state at `width` (64: the study's 67.3 M values), seeded."""
    from nfed.federation.client import host_state
    from nfed.model.wnet import WNetCD

    return host_state(WNetCD(width=width, rng=np.random.default_rng(0)))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _best(fn, repeats: int) -> float:
    """The fastest of `repeats` calls, in seconds."""
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


# ------------------------------------------------------------------------------------------ serialisation

def _old_encode(weights: Mapping[str, np.ndarray]):
    """The packing nfed used before issue 26: np.concatenate per dtype, then Array(ndarray) (np.save)."""
    from flwr.app import Array, ArrayRecord

    groups: dict[str, list[np.ndarray]] = {}
    for value in weights.values():
        groups.setdefault(value.dtype.str, []).append(value.ravel())
    return ArrayRecord({f"packed.{dtype}": Array(np.concatenate(arrays)) for dtype, arrays in groups.items()})


def _old_decode(record, weights: Mapping[str, np.ndarray]) -> dict:
    """Array.numpy() (np.load: a copy) then a copy per tensor, as record_to_weights did before issue 26."""
    packed = {key: array.numpy() for key, array in record.items()}
    offsets: dict[str, int] = {}
    out = {}
    for name, value in weights.items():
        key = f"packed.{value.dtype.str}"
        start = offsets.get(key, 0)
        out[name] = packed[key][start:start + value.size].reshape(value.shape).copy()
        offsets[key] = start + value.size
    return out


def serialisation(weights: Mapping[str, np.ndarray], repeats: int = 3) -> dict:
    """Seconds (best of `repeats`) and MB/s to encode and decode `weights`, nfed's way and the way it replaced."""
    from nfed.federation.flower.messages import record_to_weights, weights_to_record

    megabytes = sum(int(v.nbytes) for v in weights.values()) / 1e6
    record = weights_to_record(weights)
    old = _old_encode(weights)
    seconds = {"encode_s": _best(lambda: weights_to_record(weights), repeats),
               "decode_s": _best(lambda: record_to_weights(record), repeats),
               "decode_views_s": _best(lambda: record_to_weights(record, copy=False), repeats),
               "old_encode_s": _best(lambda: _old_encode(weights), repeats),
               "old_decode_s": _best(lambda: _old_decode(old, weights), repeats)}
    rates = {key.replace("_s", "_mb_per_s"): round(megabytes / max(value, 1e-9), 1) for key, value in seconds.items()}
    return {**{key: round(value, 4) for key, value in seconds.items()}, **rates}


# ------------------------------------------------------------------------------------------ plain HTTP copy

class _Echo(BaseHTTPRequestHandler):
    """POST: read the body, send it back (one copy of the bytes each way, nothing else)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):   # quiet
        pass


def http_round_trip(payload: bytes, repeats: int = 3) -> dict:
    """The same bytes down and back up through an HTTP server on 127.0.0.1 (best of `repeats`): seconds and
    MB/s both ways, the plain-copy baseline Flower's round trip is compared with."""
    server = ThreadingHTTPServer((LOOPBACK, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection(LOOPBACK, server.server_address[1], timeout=600)

        def once():
            connection.request("POST", "/", body=payload, headers={"Content-Type": "application/octet-stream"})
            reply = connection.getresponse().read()
            if len(reply) != len(payload):
                raise RuntimeError("the plain copy came back short")

        seconds = _best(once, repeats)
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    return {"http_round_trip_s": round(seconds, 4),
            "http_mb_per_s_both_ways": round(2 * len(payload) / 1e6 / max(seconds, 1e-9), 1)}


def run_transfer_bench(width: int = 8, repeats: int = 3) -> dict:
    """Serialisation and the plain HTTP copy of W-Net-CD's packed weights at `width`, with the load average."""
    import os

    from nfed.federation.flower.messages import weights_to_record

    weights = model_weights(width)
    record = weights_to_record(weights)
    payload = b"".join(array.data for array in record.values())
    return {"width": width, "parameters": sum(int(v.size) for v in weights.values()),
            "megabytes": round(sum(int(v.nbytes) for v in weights.values()) / 1e6, 2),
            "chunks_each_way": sum(math.ceil(len(array.data) / CHUNK_BYTES) for array in record.values()),
            "load_average": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
            **serialisation(weights, repeats), **http_round_trip(payload, repeats), "max_rss_mb": round(max_rss_mb())}


def summary_line(result: Mapping) -> str:
    return (f"W-Net-CD w={result['width']}: {result['megabytes']:.1f} MB; nfed encode {result['encode_mb_per_s']:.0f} "
            f"MB/s (was {result['old_encode_mb_per_s']:.0f}), decode {result['decode_mb_per_s']:.0f} MB/s, as views "
            f"{result['decode_views_mb_per_s']:.0f} MB/s (was {result['old_decode_mb_per_s']:.0f}); plain HTTP copy "
            f"on loopback {result['http_mb_per_s_both_ways']:.0f} MB/s both ways; load average "
            f"{result['load_average'][0]:.1f} on {result['cpus']} CPUs")


# ------------------------------------------------------------------------------------------ Flower apps

def flower_apps():
    """(ServerApp, ClientApp) of the Flower round trip (bench/bench_flower_transfer.py's app points at them)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from nfed.federation.compression import broadcast, decode, encode, received
    from nfed.federation.flower.exchange import exchange
    from nfed.federation.flower.messages import (record_bytes, record_to_update, record_to_weights,
                                                 update_to_record, weights_to_record)

    server_app, client_app = ServerApp(), ClientApp()

    def per_name_record(weights) -> ArrayRecord:
        return ArrayRecord({name: Array(np.asarray(value, order="C")) for name, value in weights.items()})

    def from_per_name(record) -> dict:
        return {name: array.numpy() for name, array in record.items()}

    @client_app.query()
    def echo(message: Message, context: Context) -> Message:
        """Decode the weights (if any) and send them back re-encoded, with this process's peak memory."""
        started = time.perf_counter()
        content = RecordDict()
        if "weights" in message.content:
            content["weights"] = weights_to_record(record_to_weights(message.content["weights"], copy=False))
        if "compressed" in message.content:   # a float16 broadcast in, an int8 delta (a small update) back
            start = received(record_to_weights(message.content["compressed"]))
            rng = np.random.default_rng(1)
            delta = {name: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for name, v in start.items()}
            content["compressed"] = update_to_record(encode(delta, "int8"))
        if "per_name" in message.content:  # the reference layout: one Array per parameter name
            content["per_name"] = per_name_record(from_per_name(message.content["per_name"]))
        content["info"] = ConfigRecord({"client_seconds": time.perf_counter() - started,
                                        "client_max_rss_mb": max_rss_mb()})
        return Message(content, reply_to=message)

    def round_trip(grid: Grid, node: int, content: RecordDict, label: str):
        message = Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id=label)
        started = time.perf_counter()
        reply = exchange(grid, {label: message}, timeout=1800)[label]
        seconds = time.perf_counter() - started
        if reply.message is None or reply.error is not None:
            raise RuntimeError(f"{label}: no reply ({reply.error or reply.silence(node, 1800)})")
        return reply.message, seconds

    @server_app.main()
    def bench_main(grid: Grid, context: Context) -> None:
        from pathlib import Path

        config = context.run_config
        width, repeats, out = int(config["width"]), int(config["repeats"]), Path(str(config["out"]))
        deadline = time.monotonic() + 120
        while not list(grid.get_node_ids()) and time.monotonic() < deadline:
            time.sleep(0.25)
        node = sorted(grid.get_node_ids())[0]
        weights = model_weights(width)
        nbytes = sum(int(v.nbytes) for v in weights.values())
        started = time.perf_counter()
        record = weights_to_record(weights)
        encode_seconds = time.perf_counter() - started
        per_name = per_name_record(weights)
        rows = []
        for repeat in range(repeats):
            _, empty_seconds = round_trip(grid, node, RecordDict(), f"empty-{repeat}")
            reply, weights_seconds = round_trip(grid, node, RecordDict({"weights": record}), f"weights-{repeat}")
            back = record_to_weights(reply.content["weights"], copy=False)
            identical = list(back) == list(weights) and all(np.array_equal(back[k], v) for k, v in weights.items())
            info = reply.content["info"]
            reply, per_name_seconds = round_trip(grid, node, RecordDict({"per_name": per_name}), f"per-name-{repeat}")
            back = from_per_name(reply.content["per_name"])
            identical = identical and all(np.array_equal(back[k], v) for k, v in weights.items())
            down = weights_to_record(broadcast(weights, "fp16"))
            reply, compressed_seconds = round_trip(grid, node, RecordDict({"compressed": down}), f"compressed-{repeat}")
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
        summary = {"width": width, "parameters": sum(int(v.size) for v in weights.values()),
                   "arrays": len(weights), "megabytes": nbytes / 1e6, "record_arrays": len(record),
                   "chunks_each_way": sum(math.ceil(len(a.data) / CHUNK_BYTES) for a in record.values()),
                   "encode_s": round(encode_seconds, 3), "server_max_rss_mb": round(max_rss_mb(), 1), "repeats": rows,
                   "best_weights_round_trip_s": min(r["weights_round_trip_s"] for r in rows),
                   "best_transfer_s": min(r["transfer_s"] for r in rows),
                   "median_transfer_s": statistics.median(r["transfer_s"] for r in rows),
                   "best_per_name_round_trip_s": min(r["per_name_round_trip_s"] for r in rows),
                   "best_compressed_round_trip_s": min(r["compressed_round_trip_s"] for r in rows)}
        summary["megabytes_per_s_both_ways"] = round(2 * summary["megabytes"] / max(summary["best_transfer_s"], 1e-9),
                                                     1)
        summary.update(http_round_trip(b"".join(a.data for a in record.values()), repeats))
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "repeats"}), flush=True)

    return server_app, client_app
