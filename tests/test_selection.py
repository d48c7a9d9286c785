"""Which round a federation keeps (nfed.federation.selection) on recorded curves, and the server's use of it."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from test_federation import INITIAL, PACKS, FakeTrainConfig, fake_train, tiny_packs  # noqa: F401 (a fixture)

from nfed.common.errors import ConfigError
from nfed.federation.config import FederationConfig
from nfed.federation.selection import RULES, Selection, describe, kept_round
from nfed.federation.server import federate
from nfed.model.checkpoint import load_checkpoint


def curve(losses, f1s):
    return [{"round": r, "mean_val_loss": loss, "mean_val_f1": f1}
            for r, (loss, f1) in enumerate(zip(losses, f1s), start=1)]


# The all-background plateau: the loss barely moves (its minimum comes early, at round 3) while F1 climbs.
PLATEAU = curve([0.500, 0.492, 0.4901, 0.4905, 0.4903, 0.4910, 0.4908, 0.4906, 0.4909, 0.4907],
                [0.02, 0.05, 0.06, 0.12, 0.20, 0.27, 0.33, 0.38, 0.41, 0.43])
# A noisy curve: F1 and loss swing round to round; round 5 is one lucky round, rounds 8-9 the good stretch.
NOISY = curve([0.40, 0.38, 0.37, 0.36, 0.32, 0.38, 0.37, 0.34, 0.33, 0.35],
              [0.30, 0.40, 0.33, 0.42, 0.55, 0.31, 0.40, 0.48, 0.50, 0.38])


def test_loss_rule_keeps_the_plateau_round_and_f1_the_climb():
    assert kept_round("loss", 1, PLATEAU) == 3
    assert kept_round("f1", 1, PLATEAU) == 10
    assert kept_round("f1-ma", 3, PLATEAU) == 10


def test_moving_average_ignores_one_lucky_round():
    assert kept_round("f1", 1, NOISY) == 5
    assert kept_round("loss", 1, NOISY) == 5
    # trailing windows of 3: F1 (0.40+0.48+0.50)/3 = 0.46 at round 9 beats 0.433 at round 5 and 0.453 at round 10;
    # loss (0.34+0.33+0.35)/3 = 0.34 at round 10 beats 0.35 at round 5
    assert kept_round("f1-ma", 3, NOISY) == 9
    assert kept_round("loss-ma", 3, NOISY) == 10
    assert kept_round("f1-ma", 1, NOISY) == kept_round("f1", 1, NOISY)


# Real tiles with much change (LEVIR-CD, seed 1 of the bench): round 1's model marks everything as change and
# scores F1 0.33, then the F1 dips to the plateau and climbs back to 0.32 only by round 12.
ALL_CHANGE_FIRST = curve([0.69, 0.62, 0.58, 0.57, 0.56, 0.55, 0.55, 0.54, 0.53, 0.52, 0.51, 0.50, 0.50, 0.49],
                         [0.33, 0.21, 0.18, 0.20, 0.22, 0.24, 0.25, 0.27, 0.28, 0.29, 0.30, 0.32, 0.31, 0.31])


def test_warm_up_and_full_windows_keep_the_all_change_round_from_winning():
    assert kept_round("f1", 1, ALL_CHANGE_FIRST) == 1
    assert kept_round("f1", 1, ALL_CHANGE_FIRST, warmup=10) == 12
    # a window of 3 is first full at round 3 ((0.33 + 0.21 + 0.18) / 3 = 0.24): the climb wins, not round 1
    assert kept_round("f1-ma", 3, ALL_CHANGE_FIRST) == 14
    assert kept_round("f1-ma", 3, ALL_CHANGE_FIRST[:2]) == 0   # no full window yet: nothing kept
    assert kept_round("loss", 1, ALL_CHANGE_FIRST, warmup=20) == 0


def test_online_updates_say_when_a_round_becomes_the_kept_one():
    selection = Selection("f1-ma", 3)
    became = [r["round"] for r in NOISY if selection.update(r)]
    assert became == [3, 4, 5, 9]   # full windows only
    assert selection.best_round == 9
    assert selection.best_value == pytest.approx((0.40 + 0.48 + 0.50) / 3)


def test_rounds_without_a_finite_metric_are_skipped_and_ties_keep_the_earlier_round():
    records = [{"round": 1, "mean_val_f1": 0.3}, {"round": 2, "mean_val_f1": None},
               {"round": 3, "mean_val_f1": float("nan")}, {"round": 4, "mean_val_f1": 0.3},
               {"round": 5}, {"round": 6, "mean_val_f1": True},
               {"round": 7, "mean_val_f1": 0.9, "global_val": {}}]   # not the global model's own score
    assert kept_round("f1", 1, records) == 1
    assert kept_round("f1-ma", 2, records) == 4   # rounds 1 and 4 make the first full window
    assert kept_round("loss", 1, records) == 0


def test_replay_continues_like_an_uninterrupted_run():
    for rule in RULES:
        whole = Selection(rule, 3)
        for record in NOISY:
            whole.update(record)
        resumed = Selection.replay(rule, 3, NOISY[:6])
        for record in NOISY[6:]:
            resumed.update(record)
        assert (resumed.best_round, resumed.best_value) == (whole.best_round, whole.best_value)


@pytest.mark.parametrize("rule, window", [("median", 3), ("f1", 0), ("f1-ma", 51), ("loss", 2.5), ("f1", True)])
def test_bad_rules_are_one_config_error(rule, window):
    with pytest.raises(ConfigError):
        Selection(rule, window)


def test_describe_says_the_rule():
    assert describe("loss", 3) == "lowest mean validation loss"
    assert describe("f1-ma", 5) == "highest mean validation F1, moving average over 5 rounds"


# -- the server: RUN/best.h5, summary.json and resume under a rule (fake clients from test_federation) -----------

def scripted(records):
    """An evaluate_fn whose validation metrics follow `records` round by round; on test it scores the weights."""
    by_round = {r["round"]: r for r in records}

    def evaluate(weights, setup, pack_path, *, split="val", env=None, **_):
        mean = float(np.asarray(weights["w"]).mean())
        if split == "val":
            loss, f1 = by_round[setup["round"]]["mean_val_loss"], by_round[setup["round"]]["mean_val_f1"]
        else:
            loss, f1 = 0.0, mean
        return {"loss": loss, "f1": f1, "precision": 0.5, "recall": 0.5, "iou": 0.3, "samples": 5}

    return evaluate


def global_mean(round_number: int) -> float:
    """fake_train's global mean after a round: w_r = w_{r-1}/2 + 3.1/2 from 0 (3.1: the sample-weighted target)."""
    return 3.1 * (1 - 0.5 ** round_number)


def federation(tmp_path, records, rule, window=3, rounds=10, name="run", resume=False, warmup=0):
    config = FederationConfig(rounds=rounds, select_by=rule, select_window=window, warmup_rounds=warmup, eps=0.0,
                              patience_rounds=0)
    return federate(PACKS, tmp_path / name, FakeTrainConfig(), config, resume=resume, train_fn=fake_train,
                    evaluate_fn=scripted(records), initial_weights=INITIAL)


@pytest.mark.parametrize("rule, kept", [("loss", 3), ("f1", 10), ("f1-ma", 10)])
def test_server_keeps_and_scores_the_round_of_its_rule(tmp_path, rule, kept):
    result = federation(tmp_path, PLATEAU, rule)
    assert result.best_round == kept
    saved = load_checkpoint(tmp_path / "run" / "best.h5")
    assert saved.round == kept and saved.metrics["selection_rule"] == rule
    assert float(saved.model_state["w"].mean()) == pytest.approx(global_mean(kept), rel=1e-5)
    row = next(csv.DictReader(io.StringIO((tmp_path / "run" / "federated.csv").read_text())))
    assert float(row["f1"]) == pytest.approx(global_mean(kept), rel=1e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_round"] == kept and summary["selection_rule"] == rule and summary["selection_window"] == 3
    assert summary["best_mean_val_f1"] == pytest.approx(PLATEAU[kept - 1]["mean_val_f1"])
    assert summary["best_mean_val_loss"] == pytest.approx(PLATEAU[kept - 1]["mean_val_loss"])
    assert (summary["top_mean_val_f1"], summary["top_mean_val_f1_round"]) == (pytest.approx(0.43), 10)
    assert [r["best_round"] for r in result.rounds][-1] == kept


def test_no_round_of_the_warm_up_is_kept(tmp_path):
    assert federation(tmp_path, ALL_CHANGE_FIRST, "f1", rounds=14, warmup=10).best_round == 12
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())   # round 1's 0.33 is no rival to round 12
    assert (summary["top_mean_val_f1"], summary["top_mean_val_f1_round"]) == (pytest.approx(0.32), 12)
    short = federation(tmp_path, ALL_CHANGE_FIRST, "f1", rounds=5, warmup=10, name="short")   # nothing kept
    assert short.best_round == 5 and load_checkpoint(tmp_path / "short" / "best.h5").round == 5   # the last round
    assert json.loads((tmp_path / "short" / "summary.json").read_text())["best_mean_val_f1"] is None
    resumed = federation(tmp_path, ALL_CHANGE_FIRST, "f1", rounds=14, warmup=10, name="short", resume=True)
    assert resumed.best_round == 12


def test_resume_continues_the_rule_from_rounds_jsonl_and_refuses_another_rule(tmp_path):
    whole = federation(tmp_path, NOISY, "f1-ma", name="whole")
    federation(tmp_path, NOISY, "f1-ma", rounds=6)
    resumed = federation(tmp_path, NOISY, "f1-ma", rounds=10, resume=True)
    assert resumed.best_round == whole.best_round == 9
    assert load_checkpoint(tmp_path / "run" / "best.h5").round == 9
    # another rule that keeps the same round so far continues (its state is replayed); one that does not is refused
    federation(tmp_path, NOISY, "loss", rounds=3, name="changed")   # of rounds 1-3 loss keeps 3, f1 keeps 2
    with pytest.raises(ConfigError, match="--select-by loss"):
        federation(tmp_path, NOISY, "f1", rounds=10, name="changed", resume=True)
    assert federation(tmp_path, NOISY, "loss-ma", rounds=4, name="changed", resume=True).best_round == 4


@pytest.mark.parametrize("option", [{"select_by": "median"}, {"select_window": 0}, {"select_window": 51}])
def test_federation_config_refuses_a_bad_rule(option):
    with pytest.raises(ConfigError, match="select"):
        FederationConfig(**option)


def test_federate_select_by_on_the_command_line(tiny_packs, tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    data_dir = next(iter(tiny_packs.values())).parent
    result = CliRunner().invoke(cli, ["federate", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                                      "--rounds", "2", "--width", "2", "--batch-size", "4", "--quiet",
                                      "--select-by", "f1-ma", "--select-window", "2", "--warmup-rounds", "0"])
    assert result.exit_code == 0, result.output
    assert "(highest mean validation F1, moving average over 2 rounds)" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["selection_rule"], summary["selection_window"]) == ("f1-ma", 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert summary["best_round"] == kept_round("f1-ma", 2, records)
    bad = CliRunner().invoke(cli, ["federate", "--data", str(data_dir), "--out", str(tmp_path / "r2"),
                                   "--select-by", "median"])
    assert bad.exit_code == 2 and "median" in bad.output


# -- the report says which rule kept the round, and warns when its validation F1 is far below another round's ----

def kept_report(tmp_path, kept_f1, top_f1, rule="loss", window=3):
    from report_runs import districts, make_run

    from nfed.report.comparison import compare_run
    from nfed.report.run import read_run
    from nfed.report.text import comparison_text, table_markdown

    run = make_run(tmp_path / "run", districts(), rounds=40, federation={
        "best_round": 12, "selection_rule": rule, "selection_window": window, "best_mean_val_f1": kept_f1,
        "top_mean_val_f1": top_f1, "top_mean_val_f1_round": 34})
    comparison = compare_run(read_run(run))
    return comparison.summary["warnings"], comparison_text(comparison), table_markdown(comparison)


def test_report_warns_when_the_kept_round_is_far_below_the_best_round_by_validation_f1(tmp_path):
    warnings, text, markdown = kept_report(tmp_path, 0.06, 0.29)
    assert warnings == ["the federation kept round 12 (lowest mean validation loss), whose mean validation F1 0.060 "
                        "is 0.230 below round 34's 0.290"]
    line = ("kept round 12: lowest mean validation loss; its mean validation F1 0.060, the highest of any round "
            "0.290 (round 34)")
    assert line in text and line in markdown and "warning" not in text.lower().split("fairness:")[0]


@pytest.mark.parametrize("kept_f1, top_f1", [(0.50, 0.52), (0.47, 0.52)])
def test_report_is_quiet_when_the_kept_round_is_close_to_the_best(tmp_path, kept_f1, top_f1):
    warnings, text, _ = kept_report(tmp_path, kept_f1, top_f1, rule="f1-ma", window=5)
    assert warnings == []
    assert "kept round 12: highest mean validation F1, moving average over 5 rounds" in text


def test_report_of_a_summary_without_the_rule_says_not_recorded(tmp_path):
    warnings, text, _ = kept_report(tmp_path, 0.1, 0.5, rule="bogus\x1b[2J")
    assert "kept round 12: not recorded" in text and "\x1b" not in text
    assert warnings == ["the federation kept round 12 (rule not recorded), whose mean validation F1 0.100 is 0.400 "
                        "below round 34's 0.500"]


def test_the_demo_runs_the_protocol_federate_runs_by_default():
    """One declaration (FederationConfig): nfed federate, flower-app and demo share the budget, warm-up, loss rule
    and selection rule, so the README's workflow converges as the demo does."""
    from nfed.demo import DemoSettings

    demo, federate_defaults = DemoSettings(), FederationConfig()
    assert (demo.max_rounds, demo.local_epochs, demo.patience_rounds, demo.warmup_rounds, demo.eps, demo.select_by,
            demo.select_window) == (federate_defaults.rounds, federate_defaults.local_epochs,
                                    federate_defaults.patience_rounds, federate_defaults.warmup_rounds,
                                    federate_defaults.eps, federate_defaults.select_by, federate_defaults.select_window)
    assert federate_defaults.warmup_rounds > 0 and federate_defaults.patience_rounds > 0
    assert {"select_by", "select_window"} <= set(demo.to_dict())
