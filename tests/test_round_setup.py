"""The typed round set-up (issue 27, item 2): a RoundSetup in the process, the previous dict on the wire."""
import json

import pytest

from nfed.common.errors import ConfigError
from nfed.federation.attacks import attack_setup
from nfed.federation.client import make_round_setup
from nfed.federation.round_setup import RoundSetup
from nfed.training.trainer import TrainConfig


def _setup(**options):
    return make_round_setup(TrainConfig(width=4, batch_size=2), 3, 2, **options)


def test_the_wire_form_is_the_dict_of_the_previous_version():
    config = TrainConfig(width=4, batch_size=2).to_dict()
    plain = {"round": 3, "local_epochs": 2, "config": config, "epoch_seed_offset": 4, "keep_optimizer_state": False}
    assert json.dumps(_setup().to_dict()) == json.dumps(plain)   # same keys, same order, no optional key
    full = _setup(keep_optimizer_state=True, prox_mu=0.01, norm_policy="fedbn", compress="int8-ef", dp_clip=2.0)
    wire = attack_setup("label-flip", full).to_dict()
    assert json.dumps(wire) == json.dumps({**plain, "keep_optimizer_state": True, "prox_mu": 0.01,
                                           "norm_policy": "fedbn", "compress": "int8-ef", "dp_clip": 2.0,
                                           "simulate_attack": "label-flip"})
    back = RoundSetup.from_dict(json.loads(json.dumps(wire)))
    assert back == attack_setup("label-flip", full) and back.config == TrainConfig(width=4, batch_size=2)
    assert (back.round, back.prox_mu, back.simulate_attack) == (3, 0.01, "label-flip")
    assert attack_setup("sign-flip", full) is full   # a server-side attack leaves the client's set-up alone


@pytest.mark.parametrize("change, message", [
    ({"evil": 1}, "unknown key.*evil"),
    ({"round": "3"}, "round"),
    ({"round": True}, "round"),
    ({"local_epochs": 0}, "local_epochs"),
    ({"epoch_seed_offset": -1}, "epoch_seed_offset"),
    ({"keep_optimizer_state": "yes"}, "keep_optimizer_state"),
    ({"prox_mu": float("inf")}, "prox_mu"),
    ({"dp_clip": -1.0}, "dp_clip"),
    ({"norm_policy": "mine"}, "norm policy"),
    ({"compress": "zip"}, "compression"),
    ({"simulate_attack": "noise"}, "attack"),
    ({"config": {"width": 4, "device": "cpu"}}, "unknown key.*device"),
    ({"config": [1]}, "config"),
])
def test_a_set_up_from_the_network_is_checked_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as caught:
        RoundSetup.from_dict({**_setup().to_dict(), **change})
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="lacks config"):
        RoundSetup.from_dict({"round": 1, "local_epochs": 1})
    with pytest.raises(ConfigError, match="JSON object"):
        RoundSetup.from_dict([1, 2])


def test_a_train_function_written_against_the_dict_still_reads_it():
    setup = _setup(prox_mu=0.5)
    assert setup["round"] == 3 and setup["config"]["width"] == 4 and "prox_mu" in setup and "dp_clip" not in setup
    assert dict(setup) == setup.to_dict() and setup.get("compress", "none") == "none"


def test_a_client_refuses_a_set_up_with_a_key_it_does_not_know(tmp_path):
    from nfed.federation.client import evaluate_weights, train_round

    wire = {**dict(_setup()), "evil": 1}   # before: silently ignored
    for call in (train_round, evaluate_weights):
        with pytest.raises(ConfigError, match="unknown key.*evil"):
            call({}, wire, tmp_path / "absent.h5")
