"""Norm policies (issue 24): which tensors travel under shared / fedbn / silobn, a district's BatchNorm kept by
the district (never touched by the server), training and scoring with its own BatchNorm, exact resume."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_federation import OLD_PROTOCOL, PACKS, SAMPLES, TARGETS, FakeTrainConfig

from nfed.common.errors import ConfigError
from nfed.federation.client import ClientResult
from nfed.federation.config import FederationConfig
from nfed.federation.norm_policy import NORM_POLICIES, is_local, merge, split
from nfed.federation.server import Federation, federate
from nfed.runs.runfolder import client_local_state, read_rounds

BN = ("e1.bn1.weight", "e1.bn1.bias", "e1.bn1.running_mean", "e1.bn1.running_var")
INITIAL = {"e1.conv1.weight": np.zeros(3, np.float32), "e1.bn1.weight": np.ones(2, np.float32),
           "e1.bn1.bias": np.zeros(2, np.float32), "e1.bn1.running_mean": np.zeros(2, np.float32),
           "e1.bn1.running_var": np.ones(2, np.float32)}


class Clients:
    """Fake clients: every tensor moves halfway to the district's target; what each received is kept."""

    def __init__(self):
        self.received: list[tuple[int, str, dict]] = []
        self.evaluated: list[tuple[str, str, dict]] = []

    def train(self, global_weights, setup, pack_path, *, optimizer_state=None, env=None):
        district = Path(pack_path).stem
        self.received.append((setup["round"], district, {k: np.array(v) for k, v in global_weights.items()}))
        lr = setup["config"]["lr"]
        weights = {k: (v + lr * (TARGETS[district] - v)).astype(v.dtype) for k, v in global_weights.items()}
        return ClientResult(weights, SAMPLES[district], {"train_loss": 1.0, "val_loss": 1.0, "wall_time_s": 1.0})

    def evaluate(self, weights, setup, pack_path, *, split="val", env=None, local_state=None):
        weights = merge(weights, local_state)
        self.evaluated.append((split, Path(pack_path).stem, {k: np.array(weights[k]) for k in BN}))
        loss = float(abs(weights["e1.conv1.weight"].mean() - 3.0))
        return {"loss": loss, "f1": 1.0 / (1.0 + loss), "precision": 0.5, "recall": 0.5, "iou": 0.3, "samples": 5}


def _run(tmp_path, clients, name="run", resume=False, **options):
    config = FederationConfig(**{"rounds": 1, **OLD_PROTOCOL, **options})
    return federate(PACKS, tmp_path / name, FakeTrainConfig(), config, resume=resume, train_fn=clients.train,
                    evaluate_fn=clients.evaluate, initial_weights=INITIAL)


def _moved(value, target, rounds):
    """A tensor after `rounds` halfway steps towards `target` from `value`."""
    return target + (value - target) * 0.5 ** rounds


def test_which_tensors_travel_under_each_policy():
    from nfed.training.trainer import build_model, profile_config

    names = list(build_model(profile_config("demo", width=2), "cpu").state_dict())
    local = {policy: {n for n in names if is_local(n, policy)} for policy in NORM_POLICIES}
    batchnorm = {n for n in names if ".bn" in n}
    assert local["shared"] == set()
    assert local["fedbn"] == batchnorm and len(batchnorm) == 4 * 36   # 18 modules x 2 BatchNorms x 4 tensors
    assert local["silobn"] == {n for n in batchnorm if n.endswith(("running_mean", "running_var"))}
    assert "encoder.e1.bn1.weight" in local["fedbn"] and "encoder.e1.bn1.weight" not in local["silobn"]
    assert not any(is_local(n, "fedbn") for n in ("encoder.e1.conv1.weight", "head.bias", "bnx.weight"))
    shared, own = split(INITIAL, "fedbn")
    assert set(shared) == {"e1.conv1.weight"} and set(own) == set(BN)
    assert merge(INITIAL, own).keys() == INITIAL.keys()
    with pytest.raises(ConfigError, match="--norm-policy must be one of shared, fedbn, silobn"):
        FederationConfig(norm_policy="bn")


def test_a_fedbn_round_averages_the_convolutions_and_leaves_each_districts_batchnorm_to_it(tmp_path):
    clients = Clients()
    result = _run(tmp_path, clients, norm_policy="fedbn")
    weights = result.global_weights
    np.testing.assert_allclose(weights["e1.conv1.weight"], np.full(3, 1.55), rtol=1e-6)   # (10*.5+30*1+60*2)/100
    for name in BN:   # the server's model keeps its initial BatchNorm: nothing of the districts' was averaged
        np.testing.assert_array_equal(weights[name], INITIAL[name], err_msg=name)
    for district, target in TARGETS.items():   # each district's own, exactly as its client returned it
        own = client_local_state(tmp_path / "run", district, 2)
        assert set(own) == set(BN)
        for name in BN:
            np.testing.assert_array_equal(own[name], _moved(INITIAL[name], target, 1).astype(np.float32))
    record = read_rounds(tmp_path / "run" / "rounds.jsonl")[0]
    assert record["norm_policy"] == "fedbn" and record["shared_bytes"] == 3 * 4   # the convolution only
    import json

    assert json.loads((tmp_path / "run" / "summary.json").read_text())["norm_policy"] == "fedbn"


def test_silobn_averages_scale_and_shift_but_not_the_running_statistics(tmp_path):
    clients = Clients()
    result = _run(tmp_path, clients, norm_policy="silobn")
    weights = result.global_weights
    np.testing.assert_allclose(weights["e1.bn1.weight"], np.full(2, (10 * 1 + 30 * 1.5 + 60 * 2.5) / 100), rtol=1e-6)
    np.testing.assert_allclose(weights["e1.bn1.bias"], np.full(2, 1.55), rtol=1e-6)
    for name in ("e1.bn1.running_mean", "e1.bn1.running_var"):
        np.testing.assert_array_equal(weights[name], INITIAL[name])
        np.testing.assert_array_equal(client_local_state(tmp_path / "run", "C-gu", 2)[name],
                                      _moved(INITIAL[name], 4.0, 1).astype(np.float32))
    assert set(client_local_state(tmp_path / "run", "C-gu", 2)) == {"e1.bn1.running_mean", "e1.bn1.running_var"}
    assert read_rounds(tmp_path / "run" / "rounds.jsonl")[0]["shared_bytes"] == 3 * 4 + 2 * 2 * 4


def test_shared_policy_is_todays_federation(tmp_path):
    clients = Clients()
    result = _run(tmp_path, clients)
    np.testing.assert_allclose(result.global_weights["e1.bn1.running_var"],
                               np.full(2, (10 * 1.0 + 30 * 1.5 + 60 * 2.5) / 100), rtol=1e-6)
    assert client_local_state(tmp_path / "run", "A-gu", 2) is None
    record = read_rounds(tmp_path / "run" / "rounds.jsonl")[0]
    assert record["norm_policy"] == "shared" and record["shared_bytes"] == sum(v.nbytes for v in INITIAL.values())


def test_each_district_trains_and_is_scored_with_its_own_batchnorm(tmp_path):
    clients = Clients()
    _run(tmp_path, clients, rounds=2, norm_policy="fedbn")
    received = {(r, d): w for r, d, w in clients.received}
    for district, target in TARGETS.items():
        for name in BN:   # round 1 from the initial BatchNorm, round 2 from the district's own of round 1
            np.testing.assert_array_equal(received[1, district][name], INITIAL[name])
            np.testing.assert_array_equal(received[2, district][name],
                                          _moved(INITIAL[name], target, 1).astype(np.float32))
    # validation after round 2 and the final test scoring (best round 2): each district with its own
    seen = {(split_, d): bn for split_, d, bn in clients.evaluated}
    for split_ in ("val", "test"):
        for district, target in TARGETS.items():
            np.testing.assert_allclose(seen[split_, district]["e1.bn1.weight"], _moved(1.0, target, 2), rtol=1e-6)


def test_the_best_rounds_batchnorm_is_scored_with_the_best_rounds_global_model(tmp_path):
    """The global mean walks 1.55, 2.33, 2.71, 2.91, 3.00, 3.05: round 5 is best, the run ends after 6."""
    clients = Clients()
    result = _run(tmp_path, clients, rounds=20, patience_rounds=1, norm_policy="fedbn")
    assert result.best_round == 5 and len(result.rounds) == 6
    tested = {d: bn for split_, d, bn in clients.evaluated if split_ == "test"}
    for district, target in TARGETS.items():
        np.testing.assert_allclose(tested[district]["e1.bn1.bias"], _moved(0.0, target, 5), rtol=1e-6)


def test_the_norm_difference_ignores_what_stays_local(tmp_path):
    def only_batchnorm(global_weights, setup, pack_path, **kwargs):
        return ClientResult({k: (v + 1 if ".bn" in k else v) for k, v in global_weights.items()}, 10,
                            {"wall_time_s": 1.0})

    fedbn = federate(PACKS, tmp_path / "fedbn", FakeTrainConfig(), FederationConfig(rounds=1, norm_policy="fedbn"),
                     train_fn=only_batchnorm, evaluate_fn=Clients().evaluate, initial_weights=INITIAL)
    shared = federate(PACKS, tmp_path / "shared", FakeTrainConfig(), FederationConfig(rounds=1),
                      train_fn=only_batchnorm, evaluate_fn=Clients().evaluate, initial_weights=INITIAL)
    assert fedbn.rounds[0]["norm_difference"] == 0.0
    assert shared.rounds[0]["norm_difference"] > 0.0


def test_a_district_batchnorm_that_cannot_be_used_is_rejected(tmp_path):
    def nan_batchnorm(global_weights, setup, pack_path, **kwargs):
        result = Clients().train(global_weights, setup, pack_path)
        if Path(pack_path).stem == "B-gu":
            result.weights["e1.bn1.running_var"] = np.full(2, np.nan, np.float32)
        return result

    result = federate(PACKS, tmp_path / "run", FakeTrainConfig(), FederationConfig(rounds=1, norm_policy="fedbn"),
                      train_fn=nan_batchnorm, evaluate_fn=Clients().evaluate, initial_weights=INITIAL)
    assert "NaN" in result.rounds[0]["rejected"]["B-gu"] and result.rounds[0]["answered"] == ["A-gu", "C-gu"]
    assert client_local_state(tmp_path / "run", "B-gu", 2) is None


@pytest.mark.parametrize("options", [{"aggregator": "median"}, {"dp_clip": 100.0, "dp_delta": 1e-5}])
def test_robust_and_dp_aggregation_see_only_the_shared_part(tmp_path, options):
    clients = Clients()
    result = _run(tmp_path, clients, norm_policy="fedbn", **options)
    for name in BN:
        np.testing.assert_array_equal(result.global_weights[name], INITIAL[name])
    np.testing.assert_array_equal(client_local_state(tmp_path / "run", "A-gu", 2)["e1.bn1.bias"],
                                  np.full(2, 0.5, np.float32))
    assert not np.array_equal(result.global_weights["e1.conv1.weight"], INITIAL["e1.conv1.weight"])


def test_combinations_refused_in_one_line(tmp_path):
    # over Flower and with secure aggregation the nodes keep their BatchNorm (tests/test_norm_policy_flower.py)
    from nfed.federation.flower.config import run_config_for
    from nfed.training.trainer import TrainConfig

    assert FederationConfig(norm_policy="fedbn", secure_aggregation=True).norm_policy == "fedbn"
    assert run_config_for(TrainConfig(), FederationConfig(norm_policy="silobn"), run_dir=tmp_path)["norm-policy"] == \
        "silobn"
    clients = Clients()
    _run(tmp_path, clients, norm_policy="fedbn")
    with pytest.raises(ConfigError, match="norm_policy 'fedbn' -> 'shared'"):
        _run(tmp_path, clients, rounds=2, resume=True)


def test_resume_under_fedbn_is_exact_with_sampled_districts(tmp_path):
    options = {"norm_policy": "fedbn", "fraction": 0.5, "seed": 3, "server_opt": "fedadam"}
    full = _run(tmp_path, Clients(), "full", rounds=4, **options)
    _run(tmp_path, Clients(), "split", rounds=2, **options)
    resumed = _run(tmp_path, Clients(), "split", rounds=4, resume=True, **options)
    for name, value in full.global_weights.items():
        np.testing.assert_array_equal(value, resumed.global_weights[name], err_msg=name)
    for district in TARGETS:
        ours, theirs = (client_local_state(tmp_path / run, district, 5) for run in ("full", "split"))
        assert (ours is None) == (theirs is None)
        for name in ours or {}:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{district} {name}")


WORKER_CLIENT = textwrap.dedent('''
    from nfed.federation.client import ClientResult

    def train(global_weights, setup, pack, optimizer_state=None, env=None):
        return ClientResult({k: v + 1 for k, v in global_weights.items()}, 10, {"wall_time_s": 0.0})
''')


def test_worker_processes_train_from_their_own_batchnorm(tmp_path, monkeypatch):
    from nfed.federation.worker import WorkerRunner

    (tmp_path / "plusone.py").write_text(WORKER_CLIENT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + ":".join(sys.path))
    config = FederationConfig(rounds=2, workers=3, norm_policy="fedbn")
    runner = WorkerRunner(3, tmp_path / "run" / "work", client_function="plusone:train")
    result = Federation(PACKS, tmp_path / "run", FakeTrainConfig(), config, evaluate_fn=Clients().evaluate,
                        initial_weights=INITIAL, runner=runner).run()
    np.testing.assert_array_equal(result.global_weights["e1.conv1.weight"], np.full(3, 2.0))
    np.testing.assert_array_equal(result.global_weights["e1.bn1.weight"], INITIAL["e1.bn1.weight"])
    for district in TARGETS:   # round 2 started from the district's own BatchNorm of round 1
        np.testing.assert_array_equal(client_local_state(tmp_path / "run", district, 3)["e1.bn1.weight"],
                                      np.full(2, 3.0))


# ------------------------------------------------------------------------------- real clients, tiny

@pytest.fixture(scope="module")
def tiny_packs(tmp_path_factory):
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise
    from nfed.runs.packs import find_packs

    root = tmp_path_factory.mktemp("tiny")
    synthesise(root / "synth", scale=0.002, tile=32, seed=1, districts="Gangseo-gu,Nowon-gu", min_per_district=6)
    pack_folder(root / "synth", root / "packs", seed=1)
    return find_packs(root / "packs")


def _tiny_config():
    from nfed.training.trainer import profile_config

    return profile_config("demo", width=2, batch_size=4, lr=1e-3)


def test_tiny_fedbn_federation_resumes_bit_for_bit(tiny_packs, tmp_path):
    from nfed.federation.client import host_state
    from nfed.training.trainer import build_model

    config = FederationConfig(rounds=2, norm_policy="fedbn", dp_clip=50.0)
    full = federate(tiny_packs, tmp_path / "full", _tiny_config(), config)
    initial = host_state(build_model(_tiny_config(), "cpu"))
    for name, value in full.global_weights.items():
        if is_local(name, "fedbn"):
            np.testing.assert_array_equal(value, initial[name], err_msg=name)
    own = {d: client_local_state(tmp_path / "full", d, 3) for d in tiny_packs}
    assert not np.array_equal(own["Gangseo-gu"]["encoder.e1.bn1.running_mean"],
                              own["Nowon-gu"]["encoder.e1.bn1.running_mean"])
    federate(tiny_packs, tmp_path / "split", _tiny_config(), FederationConfig(
        rounds=1, norm_policy="fedbn", dp_clip=50.0, evaluate_rounds=False), evaluate_test=False)
    resumed = federate(tiny_packs, tmp_path / "split", _tiny_config(), config, resume=True)
    for name, value in full.global_weights.items():
        np.testing.assert_array_equal(value, resumed.global_weights[name], err_msg=name)
    for district in tiny_packs:
        again = client_local_state(tmp_path / "split", district, 3)
        for name, value in own[district].items():
            np.testing.assert_array_equal(value, again[name], err_msg=f"{district} {name}")
    assert [r["f1"] for r in full.results] == [r["f1"] for r in resumed.results]



def test_personalise_starts_each_district_from_its_own_batchnorm(tiny_packs, tmp_path, monkeypatch):
    from nfed.federation.client import host_state
    from nfed.model.checkpoint import load_checkpoint
    from nfed.training import study

    federate(tiny_packs, tmp_path / "run", _tiny_config(), FederationConfig(rounds=1, norm_policy="silobn"))
    checkpoint = load_checkpoint(tmp_path / "run" / "best.h5")
    where = study.local_states_of(checkpoint, tmp_path / "run" / "best.h5")
    assert where == (tmp_path / "run", 1)
    started = {}
    monkeypatch.setattr(study, "_train_and_save",
                        lambda pack, out, config, model, env, **kw:
                        started.setdefault(pack.district, host_state(model)))
    study.personalised_column(checkpoint.model_state, list(tiny_packs.values()), tmp_path / "pers", _tiny_config(),
                              local_states=where)
    for district in tiny_packs:
        own = client_local_state(tmp_path / "run", district, 2)
        assert set(own) == {n for n in checkpoint.model_state if is_local(n, "silobn")}
        for name, value in checkpoint.model_state.items():
            np.testing.assert_array_equal(started[district][name], own.get(name, value), err_msg=name)
    with pytest.raises(ConfigError, match="client_state"):
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "best.h5").write_bytes((tmp_path / "run" / "best.h5").read_bytes())
        study.local_states_of(checkpoint, tmp_path / "elsewhere" / "best.h5")
    # a district's own tensors that do not fit the model are refused in one line naming the folder
    from nfed.common.errors import CheckpointError
    from nfed.model.checkpoint import save_checkpoint
    from nfed.runs.runfolder import state_file

    district = next(iter(tiny_packs))
    spoilt = {name: np.zeros(value.shape[0] + 1, value.dtype) for name, value in
              client_local_state(tmp_path / "run", district, 2).items()}
    save_checkpoint(state_file(tmp_path / "run", district, 1), spoilt, round=1)
    with pytest.raises(CheckpointError, match="client_state.*shape mismatch"):
        study.personalise_district(checkpoint.model_state, tiny_packs[district], tmp_path / "pers2", _tiny_config(),
                                   local_states=where)


def test_the_demos_worker_pool_trains_and_scores_each_district_with_its_own_batchnorm(tiny_packs, tmp_path):
    from nfed.federation.district_jobs import PoolRunner, WorkerPool

    config = FederationConfig(rounds=2, norm_policy="fedbn")
    alone = federate(tiny_packs, tmp_path / "alone", _tiny_config(), config)
    with WorkerPool(2) as pool, PoolRunner(pool, tmp_path / "work", tiny_packs) as runner:
        pooled = federate(tiny_packs, tmp_path / "pooled", _tiny_config(), config, runner=runner,
                          evaluate_fn=runner.evaluate)
    for name, value in alone.global_weights.items():
        np.testing.assert_allclose(value, pooled.global_weights[name], rtol=1e-4, atol=1e-6, err_msg=name)
    for district in tiny_packs:
        ours, theirs = (client_local_state(tmp_path / run, district, 3) for run in ("alone", "pooled"))
        for name, value in ours.items():
            np.testing.assert_allclose(value, theirs[name], rtol=1e-4, atol=1e-6, err_msg=f"{district} {name}")
    assert [r["f1"] for r in alone.results] == pytest.approx([r["f1"] for r in pooled.results], rel=1e-4)
