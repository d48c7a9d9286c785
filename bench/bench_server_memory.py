"""Peak memory of the ServerApp's aggregation of one round's replies (issue 26): held until the last vs streamed.

A fake grid stands for the SuperLink: it answers each train message with a W-Net-CD update of the given width,
built when it is pulled, one reply per poll, so the grid itself holds none. The server code is the real one
(Federation._collect over FlowerClients, FedAvg). Each mode runs in a child process of its own; the figure is
the child's peak resident memory during the round (VmHWM, reset when the round starts, so building the model and
the replies' template is not counted) above its resident memory once the global model is built, also in models'
worth (the model's float32 bytes).

    .venv/bin/python bench/bench_server_memory.py --width 32 --districts 25       # ~67 MB a model
    .venv/bin/python bench/bench_server_memory.py --width 64 --districts 25       # the study's 269 MB a model

Held: every reply's message stays until the round's last (n models) and then the float64 sum (2 models);
streamed: the float64 sum and the reply in flight (3 models, plus a 2 MB block the CPU sums through), whatever n.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

DISTRICT_TABLE_SAMPLES = 60   # each district's claim (below every registered count)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Start the peak resident set (VmHWM) afresh at the current one (Linux: clear_refs 5), so the set-up's own
    peak (building the model and the replies' template) is not counted; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    """The peak resident set since `_reset_peak` (VmHWM), else over the process's life (ru_maxrss)."""
    return _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LazyReplyGrid:
    """A Grid double: node i serves district i (claiming `samples[district]` training samples); a train message
    is answered with record(district), made only when the server pulls it, one reply per poll in `arrival`
    order (default: the districts'), so the grid itself holds no reply."""

    def __init__(self, districts, samples, record, arrival=None):
        self.nodes = {index + 1: district for index, district in enumerate(districts)}
        self.samples = dict(samples)
        self.record = record
        self.arrival = list(arrival or districts)
        self.waiting: dict[str, tuple[str, object]] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.waiting[message.metadata.message_id] = (self.nodes[message.metadata.dst_node_id], message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Message, RecordDict

        from nfed.federation.flower.messages import RESULT_RECORD, WEIGHTS_RECORD, json_record

        ready = [(self.arrival.index(district), message_id) for message_id, (district, _) in self.waiting.items()
                 if message_id in message_ids]
        if not ready:
            return []
        district, message = self.waiting.pop(min(ready)[1])
        samples = self.samples[district]
        if message.metadata.message_type == "query":
            content = {RESULT_RECORD: json_record(info={"district": district, "tile": 32,
                                                        "samples": {"train": samples, "val": 1, "test": 1}})}
        else:
            content = {WEIGHTS_RECORD: self.record(district),
                       RESULT_RECORD: json_record(district=district, num_samples=samples, metrics={})}
        return [Message(RecordDict(content), reply_to=message)]


def fresh_copies(weights):
    """district -> a fresh copy of the packed model's bytes (its own memory, as a reply received from the
    SuperLink); the packing is done once, before the measurement."""
    from flwr.app import Array, ArrayRecord

    from nfed.federation.flower.messages import weights_to_record

    template = weights_to_record(weights)
    return lambda district: ArrayRecord({key: Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                                                    data=bytes(memoryview(array.data)))
                                         for key, array in template.items()})


def measure(width: int, count: int, streams: bool) -> dict:
    """One round's collection and average in this process: peak memory above the resident set before it."""
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    import nfed.federation.flower.exchange as flower_exchange
    from nfed.data.districts import load_districts
    from nfed.federation.client import ClientTask, host_state
    from nfed.federation.config import FederationConfig
    from nfed.federation.flower.transport import FlowerClients
    from nfed.federation.roster import Roster
    from nfed.federation.round_setup import make_round_setup
    from nfed.federation.server import Federation
    from nfed.model.wnet import WNetCD
    from nfed.training.trainer import profile_config

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    flower_exchange.time = SimpleNamespace(monotonic=time.monotonic, sleep=lambda seconds: None)
    districts = [d.name for d in load_districts()][:count]
    weights = host_state(WNetCD(width=width, rng=np.random.default_rng(0)))
    model_mb = sum(int(v.nbytes) for v in weights.values()) / 2**20
    grid = LazyReplyGrid(districts, {d: DISTRICT_TABLE_SAMPLES for d in districts}, fresh_copies(weights))
    clients = FlowerClients(grid, Roster(districts, echo=lambda line: None),
                            timeout=None, eval_timeout=None, echo=lambda line: None)
    clients.connect(len(districts), 5.0)
    clients.streams = streams
    with tempfile.TemporaryDirectory(prefix="nfed-server-memory-") as tmp:
        federation = Federation(clients.pack_labels(), Path(tmp) / "run", profile_config("demo", width=width),
                                FederationConfig(rounds=1), initial_weights=weights, runner=clients, tile=32,
                                train_samples={d: DISTRICT_TABLE_SAMPLES for d in districts},
                                data_fingerprint={d: None for d in districts})
        setup = make_round_setup(federation.train_config, 1, federation.config.local_epochs)
        tasks = [ClientTask(d, federation.packs[d], setup) for d in districts]
        before, reset, started = _rss_mb(), _reset_peak(), time.perf_counter()
        outcomes, _, aggregator = federation._collect(clients, weights, tasks, 1)
        average = aggregator.finish()
        seconds = time.perf_counter() - started
    assert average is not None and all(o.status == "ok" for o in outcomes), [o.reason for o in outcomes]
    peak = _peak_mb(reset) - before
    return {"mode": "streamed" if streams else "held", "width": width, "districts": len(districts),
            "model_mb": round(model_mb, 1), "peak_above_start_mb": round(peak, 1),
            "models_worth": round(peak / model_mb, 2), "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32, help="W-Net-CD base width (64: the study's model)")
    parser.add_argument("--districts", type=int, default=25)
    parser.add_argument("--mode", choices=("both", "held", "streamed"), default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.mode != "both":
        print(json.dumps(measure(args.width, args.districts, args.mode == "streamed")), flush=True)
        return 0
    rows = []
    for mode in ("held", "streamed"):   # a process each: ru_maxrss is the process's peak
        out = subprocess.run([sys.executable, __file__, "--width", str(args.width), "--districts",
                              str(args.districts), "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    held, streamed = rows
    print(f"{args.districts} replies of a w{args.width} model ({held['model_mb']:.0f} MB): peak above the start "
          f"{held['peak_above_start_mb']:.0f} MB held ({held['models_worth']:.1f} models), "
          f"{streamed['peak_above_start_mb']:.0f} MB streamed ({streamed['models_worth']:.1f} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
