"""Round time and memory of nfed over Flower against in-process `nfed federate` at the same settings (issue 17).

Synthesises N demo districts (w8 model, 64-pixel tiles, the demo's fixed 16 validation and 24 test tiles), then,
per repeat, runs the same federation twice, alternating so that both see the same machine load:
- in-process: `nfed federate` in a subprocess (peak RSS from wait4);
- over Flower: a real SuperLink and one SuperNode per district on loopback (tests/flower_harness.py), the app
  written by `nfed flower-app`, `flwr run --stream`. Memory is sampled every 0.5 s as PSS (shared pages split
  between the processes sharing them) summed over each process tree: each district's SuperNode with its
  SuperExec and ClientApp processes, and the server (SuperLink, its SuperExec and the ServerApp).
Round times are the `seconds` of RUN/rounds.jsonl (training, aggregation and evaluation of the round), split
into the training phase (in-process: the clients' times one after the other; Flower: the slowest reply, as the
round waits for all) and the rest (aggregation and the evaluation of the new global model).

    .venv/bin/python bench/bench_flower_rounds.py --out /tmp/nfed-flower-rounds --rounds 3 --repeats 2
    .venv/bin/python bench/bench_flower_rounds.py --out /tmp/nfed-w64 --width 64 --districts 1 --rounds 1 \
        --flower-only --wire both      # the study's width, with and without compression (issue 26)

--wire compressed sends updates as int8 with error feedback and the global model in float16 (`--compress int8-ef
--broadcast fp16`); `both` runs plain then compressed in each repeat. Each run's bytes per round (down and up, all
districts, from rounds.jsonl) are reported with the round's wall time and the payload moved per second of the
round's time outside training (the transfers, the encoding and decoding, the aggregation and the evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRICTS = ("Gangnam-gu", "Gangdong-gu", "Gwangjin-gu", "Jung-gu", "Jongno-gu", "Mapo-gu", "Seocho-gu")


def prepare_packs(out: Path, districts: list[str], scale: float) -> Path:
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise

    packs = out / "packs"
    if sorted(p.stem for p in packs.glob("*.h5")) != sorted(districts):
        synthesise(out / "synth", scale=scale, tile=64, seed=0, districts=",".join(districts), val_tiles=16,
                   test_tiles=24, min_per_district=8)
        pack_folder(out / "synth", packs, seed=0)
    return packs


WIRE = {"plain": [], "compressed": ["--compress", "int8-ef", "--broadcast", "fp16"]}


def protocol_args(rounds: int, local_epochs: int, width: int | None = None, wire: str = "plain") -> list[str]:
    """The options both runs share (nfed federate and nfed flower-app take the same protocol options)."""
    return ["--profile", "demo", "--rounds", str(rounds), "--local-epochs", str(local_epochs), "--eps", "0",
            "--seed", "0", *([] if width is None else ["--width", str(width)]), *WIRE[wire]]


def traffic(records: list[dict]) -> dict:
    """Bytes per round down and up over all districts (as each round record's clients say), and the payload moved
    per second of the round outside its training phase."""
    down = [sum(c.get("bytes_down") or 0 for c in r["clients"].values()) for r in records]
    up = [sum(c.get("bytes_up") or 0 for c in r["clients"].values()) for r in records]
    rest = [r["seconds"] - max(c["seconds"] for c in r["clients"].values()) for r in records]
    return {"bytes_down": down, "bytes_up": up, "non_training_s": rest,
            "payload_mb_per_s": [(d + u) / 1e6 / t if t > 0 else None for d, u, t in zip(down, up, rest)]}


def read_rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def in_process(packs: Path, run_dir: Path, protocol: list[str]) -> dict:
    command = [sys.executable, "-m", "nfed.cli", "federate", "--data", str(packs), "--out", str(run_dir),
               "--overwrite", *protocol]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"nfed federate failed: {process.stderr.read()[-2000:]}")
    records = read_rounds(run_dir)
    return {"wall_s": time.monotonic() - started, "round_s": [r["seconds"] for r in records],
            "train_s": [sum(c["seconds"] for c in r["clients"].values()) for r in records],
            "peak_rss_mb": usage.ru_maxrss / 1024.0}


def pss_mb(pids) -> float:
    """Sum of the processes' proportional set sizes (smaps_rollup), in MB; processes gone are skipped."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total / 1024.0


class TreeSampler:
    """Samples the PSS of named process trees every `interval` seconds and keeps each tree's peak."""

    def __init__(self, roots: dict[str, int], interval: float = 0.5):
        from flower_harness import descendants

        self._descendants = descendants
        self.roots = roots
        self.peaks = {name: 0.0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, root in self.roots.items():
                pids = [root] + [pid for pid, _ in self._descendants(root)]
                self.peaks[name] = max(self.peaks[name], pss_mb(pids))
            self._stop.wait(0.5)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def over_flower(packs: Path, work: Path, run_dir: Path, protocol: list[str], env: dict) -> dict:
    from flower_harness import FlowerDeployment

    app = work / "app"
    subprocess.run([sys.executable, "-m", "nfed.cli", "flower-app", "--out", str(app), "--run-dir", str(run_dir),
                    "--overwrite", "--deadline", "600", "--expected-nodes", str(len(list(packs.glob("*.h5")))),
                    *protocol], check=True, stdout=subprocess.DEVNULL)
    with FlowerDeployment(work / "flower") as flower:
        flower.env.update(env)
        flower.start_superlink()
        flower.start_supernodes({path.stem: {"pack": str(path)} for path in sorted(packs.glob("*.h5"))})
        roots = {"server": flower.superlink.pid, **{name: p.pid for name, p in flower.supernodes.items()}}
        sampler = TreeSampler(roots)
        result = flower.run_app(app, timeout=3600)
        peaks = sampler.stop()
        if result.returncode != 0 or "done:" not in result.output:
            raise RuntimeError(f"flwr run failed:\n{result.output[-3000:]}\n{flower.logs()}")
    records = read_rounds(run_dir)
    return {"wall_s": result.seconds, "round_s": [r["seconds"] for r in records],
            "train_s": [max(c["seconds"] for c in r["clients"].values()) for r in records],
            "server_peak_pss_mb": peaks.pop("server"), "district_peak_pss_mb": peaks, **traffic(records)}


def summarise(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f} s (median {statistics.median(values):.1f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (packs, runs, report.json)")
    parser.add_argument("--districts", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.0125)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--width", type=int, default=None, help="W-Net base width (default: the demo profile's)")
    parser.add_argument("--wire", choices=("plain", "compressed", "both"), default="plain",
                        help="compressed: --compress int8-ef --broadcast fp16; both: plain, then compressed")
    parser.add_argument("--flower-only", action="store_true", help="skip the in-process runs")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the Flower processes (e.g. FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    args.out.mkdir(parents=True, exist_ok=True)
    packs = prepare_packs(args.out, list(DISTRICTS[:args.districts]), args.scale)
    env = dict(item.split("=", 1) for item in args.env)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "repeats": []}
    wires = ["plain", "compressed"] if args.wire == "both" else [args.wire]
    for repeat in range(args.repeats):
        row = {}
        for wire in wires:
            protocol = protocol_args(args.rounds, args.local_epochs, args.width, wire)
            tag = f"{repeat}" if wire == "plain" else f"{repeat}-{wire}"
            if not args.flower_only:
                local = in_process(packs, args.out / f"in-process-{tag}", protocol)
                print(f"[{tag}] in-process: rounds {summarise(local['round_s'])}, training "
                      f"{summarise(local['train_s'])}; peak RSS {local['peak_rss_mb']:.0f} MB", flush=True)
                row[f"in_process_{wire}"] = local
            flower = over_flower(packs, args.out / f"flower-{tag}", args.out / f"flower-run-{tag}", protocol, env)
            print(f"[{tag}] Flower ({wire}): rounds {summarise(flower['round_s'])}, training "
                  f"{summarise(flower['train_s'])}; {sum(flower['bytes_down']) / 1e6 / args.rounds:.1f} MB down, "
                  f"{sum(flower['bytes_up']) / 1e6 / args.rounds:.1f} MB up per round; "
                  f"{summarise([v for v in flower['payload_mb_per_s'] if v]).replace(' s', ' MB/s')} of payload per "
                  f"second outside training; peak PSS server {flower['server_peak_pss_mb']:.0f} MB, "
                  f"districts {summarise(list(flower['district_peak_pss_mb'].values())).replace(' s', ' MB')}",
                  flush=True)
            row[f"flower_{wire}" if args.wire == "both" else "flower"] = flower
            if not args.flower_only and args.wire != "both":
                row["in_process"] = row.pop(f"in_process_{wire}")
        report["repeats"].append(row)
    report["load_after"] = os.getloadavg()
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
