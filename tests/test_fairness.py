"""The fairness section flags every way the comparison can be unfair, and only those."""
from __future__ import annotations

import csv
import json

from report_runs import NAMES, districts, make_run, write_csv

from nfed.report.comparison import compare_run
from nfed.report.fairness import MIN_TEST_CHANGE_PIXELS, MIN_TEST_TILES
from nfed.report.run import read_run


def section_of(run):
    summary = compare_run(read_run(run)).summary
    return summary["fairness"][0], summary["warnings"]


def test_fair_run_has_no_warnings(tmp_path):
    section, warnings = section_of(make_run(tmp_path / "run", districts()))
    assert warnings == [] and section["capped"] == {"local": [], "personalised": []}
    row = section["districts"][0]
    assert (row["local_epochs_run"], row["local_steps"], row["local_stop"]) == (12, 120, "early-stop")
    assert (row["federated_epochs_run"], row["federated_steps"]) == (20, 200)
    assert (row["test_tiles"], row["test_change_pixels"]) == (30, 5000)
    assert section["centralised"]["steps"] == 900 and section["federation"]["best_round"] == 2


def test_capped_local_and_personalised_runs_are_flagged(tmp_path):
    capped = {NAMES[1]: {"local_stop": "cap"}, NAMES[3]: {"local_stop": "cap", "personalised_stop": "cap"}}
    section, warnings = section_of(make_run(tmp_path / "run", districts(**capped)))
    assert section["capped"] == {"local": [NAMES[1], NAMES[3]], "personalised": [NAMES[3]]}
    assert warnings == [f"local training of 2 district(s) ended on the epoch cap, not by early stopping: "
                        f"{NAMES[1]}, {NAMES[3]}",
                        f"personalised fine-tuning of 1 district(s) ended on the epoch cap, not by early stopping: "
                        f"{NAMES[3]}"]


def test_too_small_test_splits_are_flagged(tmp_path):
    small = {NAMES[0]: {"test_tiles": MIN_TEST_TILES - 1},
             NAMES[2]: {"test_change_pixels": MIN_TEST_CHANGE_PIXELS - 1},
             NAMES[3]: {"test_tiles": MIN_TEST_TILES, "test_change_pixels": MIN_TEST_CHANGE_PIXELS}}   # just enough
    section, warnings = section_of(make_run(tmp_path / "run", districts(**small)))
    assert section["small_test_split"] == [NAMES[0], NAMES[2]]
    assert len(warnings) == 1 and "2 district(s) have a test split too small" in warnings[0]
    assert f"{NAMES[0]} (19 tiles, 5000 change pixels)" in warnings[0] and "999 change pixels" in warnings[0]


def test_budget_stopped_federation_and_capped_central_model_are_flagged(tmp_path):
    run = make_run(tmp_path / "run", districts(), federation={"stop_rule": "budget", "rounds": 3,
                                                             "stop_reason": "round budget of 3 spent"},
                   central={"stop": "cap", "epochs_run": 40})
    section, warnings = section_of(run)
    assert section["federation"]["stop_rule"] == "budget"
    assert warnings == ["the centralised model ended on the epoch cap (40 epochs), not by early stopping",
                        "the federation ended on its round budget (3 rounds), not by a convergence rule"]


def test_budget_stop_of_an_older_run_is_read_from_its_rounds(tmp_path):
    run = make_run(tmp_path / "run", districts(), columns=("local", "federated"), old_format=True)
    path = run / "federated" / "rounds.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["stop"] = "round budget of 3 spent"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    section, warnings = section_of(run)
    assert section["federation"] == {"rounds": 3, "best_round": None, "stop_rule": "budget",
                                     "stop_reason": "round budget of 3 spent"}
    assert any("round budget (3 rounds)" in w for w in warnings)


def test_different_test_splits_and_missing_results_are_flagged(tmp_path):
    run = make_run(tmp_path / "run", districts(**{NAMES[2]: {"personalised": None}}))
    path = run / "central" / "central.csv"
    rows = list(csv.DictReader(path.open()))
    rows[1]["test_pixels"] = "999"
    write_csv(path, list(rows[0]), rows)
    section, warnings = section_of(run)
    assert section["different_test_splits"] == [NAMES[1]]
    assert section["missing"] == {"personalised": [NAMES[2]]}
    assert warnings == [f"columns scored on test splits of different sizes in: {NAMES[1]}",
                        f"no personalised result for {NAMES[2]}"]


def test_personalised_that_kept_the_global_model_is_shown(tmp_path):
    from nfed.report.text import fairness_markdown

    run = make_run(tmp_path / "run", districts(**{NAMES[0]: {"personalised_best_epoch": 0}}))
    section, _ = section_of(run)
    table = "\n".join(fairness_markdown(section, "Run"))
    assert "4 / 40 / early-stop (global kept)" in table
    assert "optimiser steps over all districts: local 480, federated 800, personalised 160, centralised 900" in table
