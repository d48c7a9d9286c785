"""The testing-only attack switch: hostile updates on a 3-district federation, what the robust aggregators make
of them, label flipping, and the new options' validation on the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_federation import PACKS, SAMPLES, TARGETS, FakeTrainConfig, fake_evaluate, fake_train
from test_flower import make_tiny_packs
from test_hardening import invoke, one_line_error

from nfed.common.errors import ConfigError
from nfed.federation.attacks import FlippedMasks, attack_result, choose_attackers
from nfed.federation.client import ClientResult
from nfed.federation.config import FederationConfig
from nfed.federation.server import federate
from nfed.runs.runfolder import read_rounds

INITIAL = {"w": np.zeros(3, np.float32), "bn.running_var": np.ones(2, np.float32)}
ATTACKER = choose_attackers(list(PACKS), 1, seed=0)[0]


def run(tmp_path, **options):
    config = FederationConfig(**{"rounds": 1, "eps": 0.0, **options})
    return federate(PACKS, tmp_path / "run", FakeTrainConfig(), config, train_fn=fake_train,
                    evaluate_fn=fake_evaluate, initial_weights=INITIAL, overwrite=True)


def honest(district):
    return TARGETS[district] / 2   # fake_train moves every weight from 0 halfway to the district's target


def test_sign_flip_on_fedavg_and_on_the_median(tmp_path):
    hostile = -5 * honest(ATTACKER)
    values = {d: hostile if d == ATTACKER else honest(d) for d in PACKS}
    fedavg = run(tmp_path, simulate_attack="sign-flip", attackers=1)
    expected = sum(values[d] * SAMPLES[d] for d in PACKS) / sum(SAMPLES.values())
    np.testing.assert_allclose(fedavg.global_weights["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(fedavg.global_weights["bn.running_var"],   # statistics are sent honestly
                               sum((1 + TARGETS[d]) / 2 * SAMPLES[d] for d in PACKS) / sum(SAMPLES.values()), rtol=1e-6)
    record = read_rounds(tmp_path / "run" / "rounds.jsonl")[0]
    assert record["clients"][ATTACKER]["attacker"] == "sign-flip"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["simulated_attack"] == {"kind": "sign-flip", "attackers": [ATTACKER]}
    median = run(tmp_path, simulate_attack="sign-flip", attackers=1, aggregator="median")
    np.testing.assert_allclose(median.global_weights["w"], np.median(list(values.values())), rtol=1e-6)


def test_scaled_and_noise_attacks_keep_updates_well_formed():
    rng = np.random.default_rng(0)
    global_weights = {"w": np.ones(4, np.float32), "bn.running_var": np.ones(2, np.float32)}
    result = ClientResult({"w": np.full(4, 1.5, np.float32), "bn.running_var": np.full(2, 0.5, np.float32)}, 7)
    scaled = attack_result("scaled", result, global_weights, rng)
    np.testing.assert_allclose(scaled.weights["w"], 1 + 1000 * 0.5)
    np.testing.assert_array_equal(scaled.weights["bn.running_var"], 0.5)
    noise = attack_result("noise", result, global_weights, rng)
    assert noise.weights["w"].dtype == np.float32 and not np.allclose(noise.weights["w"], 1.5)
    assert attack_result("sample-inflation", result, global_weights, rng).num_samples == 10**12


def test_sample_inflation_takes_over_fedavg_unless_capped(tmp_path):
    inflated = run(tmp_path, simulate_attack="sample-inflation", attackers=1)
    np.testing.assert_allclose(inflated.global_weights["w"], honest(ATTACKER), rtol=1e-6)
    shared = run(tmp_path, simulate_attack="sample-inflation", attackers=1, max_sample_share=0.5)
    record = shared.rounds[0]["clients"][ATTACKER]
    assert "max share 0.5" in record["capped"]
    others = sum(SAMPLES[d] for d in PACKS if d != ATTACKER)
    assert record["weight"] == others       # half of the total: as much as all the others together


def test_label_flip_trains_the_attacker_on_inverted_masks(tmp_path):
    from nfed.data.reader import DistrictPack

    pack_path = make_tiny_packs(tmp_path / "packs", districts=("Gangnam-gu",), counts=((3, 2, 1),))["Gangnam-gu"]
    with DistrictPack(pack_path) as pack:
        flipped = FlippedMasks(pack)
        _, _, mask, _ = pack.read("train", [0, 1, 2])
        _, _, inverted, _ = flipped.read("train", [0, 1, 2])
        np.testing.assert_array_equal(inverted, (mask == 0).astype(mask.dtype))
        np.testing.assert_array_equal(flipped.read("val", [0])[2], pack.read("val", [0])[2])   # only training
        batch = next(flipped.batches("train", 3, shuffle=False))
        np.testing.assert_array_equal(batch.mask, inverted.astype(np.int64))


def test_attackers_are_seeded_and_bounded():
    names = [f"D{i}-gu" for i in range(25)]
    assert choose_attackers(names, 5, 0) == choose_attackers(names, 5, 0)
    assert choose_attackers(names, 5, 0) != choose_attackers(names, 5, 1)
    with pytest.raises(ConfigError, match="exceeds"):
        choose_attackers(names[:3], 4, 0)


def test_attack_switch_on_a_real_three_district_federation(tmp_path):
    from nfed.cli import cli

    make_tiny_packs(tmp_path / "packs")
    args = ["federate", "--data", str(tmp_path / "packs"), "--out", str(tmp_path / "run"), "--rounds", "1",
            "--width", "4", "--batch-size", "2", "--eps", "0", "--quiet", "--no-round-eval"]
    result = CliRunner().invoke(cli, args + ["--aggregator", "median", "--simulate-attack", "scaled",
                                             "--attackers", "1"])
    assert result.exit_code == 0, result.output
    assert "SIMULATED ATTACK (testing only): scaled by" in result.output
    record = read_rounds(tmp_path / "run" / "rounds.jsonl")[0]
    assert record["aggregator"] == "median" and len(record["answered"]) == 3
    assert [d for d, e in record["clients"].items() if e.get("attacker") == "scaled"] == \
        choose_attackers(["Gangnam-gu", "Gangdong-gu", "Gwangjin-gu"], 1, 0)


@pytest.mark.parametrize("options, message", [
    (["--attackers", "1"], "--simulate-attack KIND and --attackers N"),
    (["--simulate-attack", "noise"], "--simulate-attack KIND and --attackers N"),
    (["--dp-noise", "1"], "--dp-noise needs --dp-clip"),
    (["--dp-clip", "1", "--aggregator", "median"], "cannot be combined with --aggregator median"),
    (["--trim-beta", "0.5"], "--trim-beta 0.5: must be a finite number >= 0 and < 0.5"),
    (["--max-sample-share", "0"], "--max-sample-share 0"),
    (["--dp-delta", "1"], "--dp-delta 1"),
    (["--simulate-attack", "noise", "--attackers", "9"], "--attackers 9 exceeds the 3 district(s)"),
])
def test_bad_defence_options_fail_in_one_line(tmp_path, options, message):
    make_tiny_packs(tmp_path / "packs")
    result = invoke("federate", "--data", tmp_path / "packs", "--out", tmp_path / "run", "--rounds", "1",
                    "--width", "4", *options)
    one_line_error(result, message)
