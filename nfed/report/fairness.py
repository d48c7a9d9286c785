"""Is the comparison fair? How far each side was trained and how much test data each F1 rests on.

Per district: local epochs/steps/stop, federated epochs/steps (summed over the rounds the client answered),
personalised epochs/steps/stop, test tiles/pixels/change pixels; the centralised model's and the federation's
training; and the unfairness found, one warning each: trainings that ended on their cap instead of their
stop rule, a federation that ended on its round budget, a kept round whose validation F1 is far below another
round's, test splits too small to carry an F1, districts scored on different test splits, results missing for a
district, fields the files do not record.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nfed.federation.selection import RULES, describe, finite

if TYPE_CHECKING:
    from nfed.report.run import Run

MIN_TEST_TILES = 20
MIN_TEST_CHANGE_PIXELS = 1_000
TEST_FIELDS = ("test_tiles", "test_pixels", "test_change_pixels")
TRAINING_FIELDS = ("epochs_run", "steps", "stop", "best_epoch")
# What each results file should record for the fairness section (centralised: its training is summary.json).
EXPECTED_FIELDS = {"local": TRAINING_FIELDS + TEST_FIELDS, "federated": ("epochs_run", "steps") + TEST_FIELDS,
                   "personalised": TRAINING_FIELDS + TEST_FIELDS, "centralised": TEST_FIELDS}
CENTRAL_FIELDS = ("epochs_run", "steps", "stop", "best_epoch", "train_samples")
CAPPED_WORDS = {"local": "local training", "personalised": "personalised fine-tuning"}
FAR_BELOW = 0.05   # the kept round's mean validation F1 this far (absolute) below the best round's is warned about


def _district_row(run: Run, name: str) -> dict:
    """Test split and training of one district in every column that trains per district."""
    records = {c: results.get(name, {}) for c, results in run.results.items()}
    row = {"district": name}
    for key in TEST_FIELDS:
        row[key] = next((r[key] for r in records.values() if key in r), None)
    for column in ("local", "federated", "personalised"):
        if column in records:
            row.update({f"{column}_{key}": records[column].get(key) for key in TRAINING_FIELDS
                        if key in EXPECTED_FIELDS[column]})
    return row


def split_too_small(row: dict) -> bool:
    """Fewer than MIN_TEST_TILES test tiles or MIN_TEST_CHANGE_PIXELS change pixels (unrecorded: not flagged)."""
    tiles, change = row.get("test_tiles"), row.get("test_change_pixels")
    return (tiles is not None and tiles < MIN_TEST_TILES) or (change is not None and change < MIN_TEST_CHANGE_PIXELS)


def federation_stop(run: Run) -> dict:
    """Rounds run, best round kept, the stop rule that fired and its sentence (from federated/summary.json;
    older runs: the number of rounds and the last round's stop sentence in rounds.jsonl)."""
    summary = run.federation
    last_stop = next((r.get("stop") for r in reversed(run.rounds) if r.get("stop")), None)
    reason = summary.get("stop_reason", last_stop)
    rule = summary.get("stop_rule")
    if rule is None and reason and reason.startswith("round budget"):
        rule = "budget"
    return {"rounds": summary.get("rounds", len(run.rounds) or None), "best_round": summary.get("best_round"),
            "stop_rule": rule, "stop_reason": reason}


def kept_round(run: Run) -> dict:
    """The kept round, the rule that kept it, its mean validation F1 and the highest of any round (from
    federated/summary.json; runs before the rule was recorded leave them None)."""
    summary = run.federation
    rule, window = summary.get("selection_rule"), summary.get("selection_window")
    known = rule in RULES and isinstance(window, int) and not isinstance(window, bool) and window >= 1
    kept, top = (summary.get(k) for k in ("best_mean_val_f1", "top_mean_val_f1"))
    best, top_round = summary.get("best_round"), summary.get("top_mean_val_f1_round")
    return {"round": best if isinstance(best, int) and not isinstance(best, bool) else None,
            "rule": describe(rule, window) if known else None,
            "val_f1": kept if finite(kept) else None, "top_val_f1": top if finite(top) else None,
            "top_round": top_round if isinstance(top_round, int) and not isinstance(top_round, bool) else None}


def _not_recorded(run: Run) -> dict[str, list[str]]:
    """file -> the expected fields no record of it has."""
    missing = {}
    for column, results in run.results.items():
        absent = [k for k in EXPECTED_FIELDS[column] if not any(k in r for r in results.values())]
        if absent:
            missing[str(run.sources[column])] = absent
    if "centralised" in run.results and not run.central:
        missing[str(run.sources["centralised"].parent / "summary.json")] = list(CENTRAL_FIELDS)
    return missing


def _different_test_splits(run: Run, districts: list[str]) -> list[str]:
    return [name for name in districts
            if len({r[name]["test_pixels"] for r in run.results.values() if "test_pixels" in r.get(name, {})}) > 1]


def fairness(run: Run, districts: list[str]) -> dict:
    """The fairness section of one seed for `districts` (those in the table), with its warnings."""
    rows = [_district_row(run, name) for name in districts]
    central = {k: run.central.get(k) for k in CENTRAL_FIELDS} if run.central else None
    section = {
        "run": run.label, "districts": rows, "federation": federation_stop(run), "kept": kept_round(run),
        "centralised": central,
        "capped": {c: [n for n in districts if run.results[c].get(n, {}).get("stop") == "cap"]
                   for c in CAPPED_WORDS if c in run.results},
        "small_test_split": [row["district"] for row in rows if split_too_small(row)],
        "different_test_splits": _different_test_splits(run, districts),
        "missing": {c: [n for n in districts if n not in run.results[c]] for c in ("personalised", "centralised")
                    if c in run.results and any(n not in run.results[c] for n in districts)},
        "not_recorded": _not_recorded(run),
    }
    section["warnings"] = fairness_warnings(section)
    return section


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fairness_warnings(section: dict) -> list[str]:
    """One line per kind of unfairness in a fairness section."""
    out = []
    for column, names in section["capped"].items():
        if names:
            out.append(f"{CAPPED_WORDS[column]} of {len(names)} district(s) ended on the epoch cap, not by early "
                       f"stopping: {_names(names)}")
    central = section["centralised"] or {}
    if central.get("stop") == "cap":
        out.append(f"the centralised model ended on the epoch cap ({central.get('epochs_run')} epochs), not by "
                   f"early stopping")
    federation = section["federation"]
    if federation["stop_rule"] == "budget":
        out.append(f"the federation ended on its round budget ({federation['rounds']} rounds), not by a "
                   f"convergence rule")
    kept = section.get("kept") or {}
    if kept.get("val_f1") is not None and kept.get("top_val_f1") is not None \
            and kept["top_val_f1"] - kept["val_f1"] > FAR_BELOW + 1e-9:   # exactly FAR_BELOW is not far
        out.append(f"the federation kept round {kept['round']} ({kept['rule'] or 'rule not recorded'}), whose mean "
                   f"validation F1 {kept['val_f1']:.3f} is {kept['top_val_f1'] - kept['val_f1']:.3f} below round "
                   f"{kept['top_round']}'s {kept['top_val_f1']:.3f}")
    by_name = {row["district"]: row for row in section["districts"]}
    small = section["small_test_split"]
    if small:
        details = [f"{n} ({by_name[n]['test_tiles']} tiles, {by_name[n]['test_change_pixels']} change pixels)"
                   for n in small]
        out.append(f"{len(small)} district(s) have a test split too small to carry an F1 (< {MIN_TEST_TILES} tiles "
                   f"or < {MIN_TEST_CHANGE_PIXELS:,} change pixels): {_names(details)}")
    if section["different_test_splits"]:
        out.append(f"columns scored on test splits of different sizes in: {_names(section['different_test_splits'])}")
    for column, names in section["missing"].items():
        out.append(f"no {column} result for {_names(names)}")
    for path, fields in section["not_recorded"].items():
        out.append(f"{path}: {', '.join(fields)} not recorded, so this part of the comparison cannot be checked")
    return out
