"""Hand-made study run folders (the layout `nfed demo --out RUN` writes) for the report's tests."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from nfed.data.districts import load_districts

RESULT = ("district", "samples", "precision", "recall", "f1", "iou")
TEST_SPLIT = ("train_samples", "test_tiles", "test_pixels", "test_change_pixels")
TRAINING = ("epochs_run", "steps", "stop", "best_epoch")
LAYOUT = {"local": ("local/local.csv", RESULT + TEST_SPLIT + TRAINING),
          "federated": ("federated/federated.csv", RESULT + TEST_SPLIT + TRAINING[:2]),
          "personalised": ("personalised/personalised.csv", RESULT + TEST_SPLIT + TRAINING),
          "centralised": ("central/central.csv", RESULT + TEST_SPLIT)}
# A fair district: enough test data, every side stopped by its own rule.
FAIR = {"train_samples": 60, "test_tiles": 30, "test_pixels": 30 * 64 * 64, "test_change_pixels": 5000,
        "local": {"epochs_run": 12, "steps": 120, "stop": "early-stop", "best_epoch": 9},
        "federated": {"epochs_run": 20, "steps": 200},
        "personalised": {"epochs_run": 4, "steps": 40, "stop": "early-stop", "best_epoch": 1}}


def write_csv(path: Path, columns, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_run(root: Path, districts: list[dict], *, columns=("local", "federated", "personalised", "centralised"),
             old_format: bool = False, rounds: int = 3, federation: dict | None = None,
             central: dict | None = None) -> Path:
    """Write RUN = root: one entry per district {name, samples, local, federated, ... (F1 values), optional
    test_tiles/test_change_pixels/local_stop/... overrides}. old_format: only the six first columns."""
    for column in columns:
        name, fields = LAYOUT[column]
        rows = []
        for d in districts:
            if d.get(column) is None:
                continue
            row = {"district": d["name"], "samples": d["samples"], "precision": 0.5, "recall": 0.5,
                   "f1": d[column], "iou": 0.3, **{k: d.get(k, FAIR[k]) for k in TEST_SPLIT}}
            row.update({k: d.get(f"{column}_{k}", v) for k, v in FAIR.get(column, {}).items()})
            rows.append(row)
        write_csv(root / name, RESULT if old_format else fields, rows)
    records = [{"round": r, "global_val": {d["name"]: {"f1": min(1.0, d["federated"] * r / rounds), "loss": 1.0,
                                                       "samples": 5} for d in districts},
                "stop": None if r < rounds else "norm difference below eps"} for r in range(1, rounds + 1)]
    (root / "federated" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if not old_format:
        summary = {"rounds": rounds, "best_round": rounds - 1, "stop_rule": "norm",
                   "stop_reason": "norm difference below eps", **(federation or {})}
        (root / "federated" / "summary.json").write_text(json.dumps(summary))
        if "centralised" in columns:
            summary = {"epochs_run": 15, "steps": 900, "stop": "early-stop", "best_epoch": 12, "train_samples": 1500,
                       **(central or {})}
            (root / "central" / "summary.json").write_text(json.dumps(summary))
    return root


NAMES = [d.name for d in load_districts()[:4]]
SAMPLES = [100, 50, 400, 800]
# small districts start low and gain most; the largest loses a little
F1 = {"local": [0.4, 0.2, 0.6, 0.8], "federated": [0.6, 0.5, 0.66, 0.78],
      "personalised": [0.62, 0.52, 0.70, 0.80], "centralised": [0.65, 0.60, 0.70, 0.78]}


def districts(shift_local: float = 0.0, **overrides) -> list[dict]:
    """The four first study districts with the F1 values above (local shifted by shift_local), each entry
    updated from overrides[name]."""
    out = []
    for i, name in enumerate(NAMES):
        d = {"name": name, "samples": SAMPLES[i], **{c: v[i] for c, v in F1.items()}}
        d["local"] = round(d["local"] + shift_local, 6)
        d.update(overrides.get(name, {}))
        out.append(d)
    return out
