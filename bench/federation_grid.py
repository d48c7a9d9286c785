"""Shared by the federation benches: demo packs of a chosen size and one federated run per cell of a grid, kept in
a JSON file as it goes (a rerun skips finished cells; --fresh starts over; bench_attacks.py, bench_privacy.py), and
the real LEVIR-CD sample tiles packed into pseudo-districts (bench_selection.py, bench_wire.py); the table cells and
the traffic per reply that bench_noniid.py and bench_wire.py both show."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def size_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options that size every run of the grid (what the report must state)."""
    parser.add_argument("--out", type=Path, required=True, help="work folder (packs, runs, results)")
    parser.add_argument("--data", type=Path, help="existing packs folder (default: synthesise the demo's districts)")
    parser.add_argument("--scale", type=float, default=0.0125, help="share of the study's samples (demo: 0.0125)")
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--val-tiles", type=int, default=8)
    parser.add_argument("--test-tiles", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="client learning rate (demo profile's by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="discard finished cells and run every one again")
    parser.add_argument("--part", default="", help="name of a parallel part: its cells go to OUT/<bench>-PART.json")
    parser.add_argument("--table-only", action="store_true", help="write the outputs from finished cells, run none")


def prepare_packs(args) -> dict[str, Path]:
    """The demo's 25 synthetic districts at --scale/--tile, packed once into OUT/packs."""
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise
    from nfed.runs.packs import find_packs

    if args.data:
        return find_packs(args.data)
    packs = args.out / "packs"
    if not any(packs.glob("*.h5")):
        synthesise(args.out / "synth", scale=args.scale, tile=args.tile, seed=args.seed, min_per_district=4,
                   val_tiles=args.val_tiles, test_tiles=args.test_tiles)
        pack_folder(args.out / "synth", packs, seed=args.seed)
    return find_packs(packs)


def train_config(args):
    from nfed.training.trainer import profile_config

    return profile_config("demo", width=args.width, lr=args.lr, seed=args.seed)


def size_record(args) -> dict:
    return {key: getattr(args, key) for key in ("scale", "tile", "width", "val_tiles", "test_tiles", "rounds",
                                                "local_epochs", "lr", "seed")}


class Grid:
    """Cells of a bench run one at a time, each result saved to OUT/<name>.json as soon as it is known."""

    def __init__(self, path: Path, size: dict, fresh: bool, table_only: bool = False):
        """Cells already finished at the same size in PATH or its siblings PATH.stem-*.json (parallel parts
        of one grid, see --part) are reused."""
        self.path = path
        self.table_only = table_only
        self.data = {"size": size, "cells": {}}
        for known in [path, *sorted(path.parent.glob(f"{path.stem.split('-')[0]}-*.json"))]:
            saved = json.loads(known.read_text()) if known.is_file() and not fresh else {}
            if saved.get("size") == size:   # other sizes give other numbers: never mix them
                self.data["cells"].update(saved.get("cells", {}))

    def run(self, key: str, packs, train_config, fed_config, run_dir: Path, extra: dict | None = None) -> dict:
        """Mean test F1 and loss over the districts of the final global model of one federation (cached)."""
        from nfed.federation.client import evaluate_weights, make_round_setup
        from nfed.federation.server import federate

        if key in self.data["cells"] or self.table_only:
            return self.data["cells"].get(key)
        started = time.perf_counter()
        result = federate(packs, run_dir, train_config, fed_config, overwrite=True, evaluate_test=False,
                          echo=lambda line: print(f"  [{key}] {line}", file=sys.stderr))
        setup = make_round_setup(train_config, 1, 1)
        scores = [evaluate_weights(result.global_weights, setup, path, split="test") for path in packs.values()]
        cell = {"mean_test_f1": sum(s["f1"] for s in scores) / len(scores),
                "mean_test_loss": sum(s["loss"] for s in scores) / len(scores), "rounds": len(result.rounds),
                "kept_previous": sum(1 for r in result.rounds if r["kept_previous"]),
                "seconds": round(time.perf_counter() - started, 1), **(extra or {})}
        privacy = result.rounds[-1].get("privacy") if result.rounds else None
        if privacy:
            cell["epsilon"] = privacy["epsilon"]
        self.data["cells"][key] = cell
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"{key}: mean test F1 {cell['mean_test_f1']:.4f}, loss {cell['mean_test_loss']:.4f} "
              f"({cell['seconds']:.0f} s)", flush=True)
        return cell


LEVIR_DISTRICTS = 3


def levir_packs(out: Path, levir: Path) -> dict[str, Path]:
    """OUT/levir-data/packs: the labelled LEVIR-CD pairs dealt round-robin into pseudo-districts (a district map),
    64 px tiles, split 0.6/0.2/0.2 (made once, then reused)."""
    from nfed.common.atomic import write_text_atomic
    from nfed.common.errors import NfedError
    from nfed.data.pack import pack_folder
    from nfed.runs.packs import find_packs

    folder = out / "levir-data"
    if (folder / "packs").is_dir():
        return find_packs(folder / "packs")
    stems = sorted(p.stem for p in (levir / "label").glob("*.png"))
    if len(stems) < LEVIR_DISTRICTS:
        raise SystemExit(f"{levir}: {len(stems)} labelled LEVIR-CD pairs (label/*.png), "
                         f"{LEVIR_DISTRICTS} pseudo-districts need at least {LEVIR_DISTRICTS}")
    folder.mkdir(parents=True, exist_ok=True)
    mapping = folder / "district-map.csv"
    write_text_atomic(mapping, "stem,district\n" + "".join(f"{stem},levir-{i % LEVIR_DISTRICTS}\n"
                                                           for i, stem in enumerate(stems)))
    try:
        pack_folder(levir, folder / "packs", fmt="levir", tile=64, split=(0.6, 0.2, 0.2), seed=0,
                    district_map=mapping, skip_bad=True)
    except NfedError as exc:
        raise SystemExit(f"packing LEVIR-CD for the benchmark: {exc}") from None
    return find_packs(folder / "packs")


def interval_text(value: dict, digits: int = 3) -> str:
    """A mean_interval as a table cell: "mean ± half-width" (the mean alone from one seed, "–" from none)."""
    if value.get("mean") is None:
        return "–"
    if value.get("low") is None:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ± {(value['high'] - value['low']) / 2:.{digits}f}"


def difference_text(value: dict) -> str:
    """A paired difference's mean_interval as a table cell: "+mean [+low, +high]" ("–" from no seed)."""
    if value.get("mean") is None:
        return "–"
    interval = "" if value.get("low") is None else f" [{value['low']:+.3f}, {value['high']:+.3f}]"
    return f"{value['mean']:+.3f}{interval}"


def traffic_per_reply(records: list[dict]) -> tuple[float, float] | None:
    """Bytes up and down per district and round, after encoding, over a run's rounds.jsonl (None: no reply)."""
    replies = sum(len(r.get("answered", ())) for r in records)
    if not replies:
        return None
    return (sum(r.get("bytes_up", 0) for r in records) / replies,
            sum(r.get("bytes_down", 0) for r in records) / replies)
