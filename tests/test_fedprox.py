"""FedProx (`--prox-mu`): the proximal gradient, bit-identical FedAvg at mu = 0, a pull towards the global
weights at mu > 0, and the option's path (validation, the round set-up, Flower's run config, resume)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_federation import PACKS, _run, fake_train
from test_training import synthetic_pack

from nfed.common.errors import ConfigError
from nfed.core import nn
from nfed.core.autograd import no_grad
from nfed.federation.client import PROX_MU_KEY, make_round_setup, train_round
from nfed.federation.config import FederationConfig
from nfed.training.trainer import TrainConfig, add_proximal_gradient, build_model, build_optimizer, fit


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory) -> Path:
    return synthetic_pack(tmp_path_factory.mktemp("packs") / "Jung-gu.h5")


def _tiny(**changes) -> TrainConfig:
    return TrainConfig(width=2, lr=1e-3, batch_size=4, epochs=2, patience=2).replace(**changes)


def _float64(module: nn.Module) -> nn.Module:
    for _, p in module.named_parameters():
        p.data = p.data.astype(np.float64)
    for sub in module.modules():
        for name, buffer in list(sub._buffers.items()):
            sub._buffers[name] = buffer.astype(np.float64)
    return module


def test_the_proximal_gradient_matches_finite_differences_of_the_full_objective():
    """d/dw [loss(w) + mu/2 ||w - w0||^2] = backward's gradient + mu (w - w0), against float64 central
    differences along random directions of every parameter (conv weight and bias, BatchNorm gamma and beta)."""
    rng = np.random.default_rng(0)
    model = _float64(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.BatchNorm2d(3), nn.ReLU()))
    model.eval()   # fixed statistics: the objective is a function of the parameters alone
    x = rng.standard_normal((2, 2, 5, 5))
    projection = rng.standard_normal((2, 3, 5, 5))
    mu = 0.7
    reference = {name: p.data + rng.standard_normal(p.data.shape) for name, p in model.named_parameters()}

    def objective() -> float:
        with no_grad():
            loss = float((model(x).data * projection).sum())
        return loss + mu / 2 * sum(float(np.sum((p.data - reference[n]) ** 2)) for n, p in model.named_parameters())

    model.zero_grad()
    (model(x) * projection).sum().backward()
    add_proximal_gradient(model, mu, reference)
    eps = 1e-6
    for name, p in model.named_parameters():
        analytic = p.grad.copy()
        for _ in range(3):
            direction = rng.standard_normal(p.data.shape)
            start = p.data.copy()
            p.data = start + eps * direction
            up = objective()
            p.data = start - eps * direction
            down = objective()
            p.data = start
            numeric = (up - down) / (2 * eps)
            assert np.isclose(float(np.sum(analytic * direction)), numeric, rtol=1e-6, atol=1e-7), name


def _client(pack_path, setup):
    config = TrainConfig.from_dict(setup["config"])
    start = {k: np.array(v) for k, v in build_model(config).state_dict().items()}
    return start, train_round(start, setup, pack_path).weights


def test_mu_zero_is_todays_client_bit_for_bit(pack_path):
    """No key in the set-up at mu = 0, and the client's weights equal a plain fit's (the code before FedProx)."""
    setup = make_round_setup(_tiny(), 1, 2, prox_mu=0.0)
    assert setup == make_round_setup(_tiny(), 1, 2) and PROX_MU_KEY not in setup
    _, weights = _client(pack_path, setup)
    from nfed.data.reader import DistrictPack

    for proximal in (None, (0.0, None)):
        model = build_model(_tiny())
        if proximal is not None:
            proximal = (0.0, {n: p.data.copy() for n, p in model.named_parameters()})
        with DistrictPack(pack_path) as pack:
            fit(model, build_optimizer(model, _tiny()), pack, _tiny(), epochs=2, early_stopping=False,
                validate_last_only=True, proximal=proximal)
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_mu_pulls_the_client_towards_the_global_weights(pack_path):
    """With mu > 0 the trainable weights end closer to the global ones than FedAvg's client's."""
    def distance(mu):
        start, weights = _client(pack_path, make_round_setup(_tiny(), 1, 3, prox_mu=mu))
        return sum(float(np.sum((weights[k] - start[k]) ** 2)) for k in start if "running" not in k) ** 0.5

    plain, pulled = distance(0.0), distance(100.0)
    assert 0 < pulled < 0.8 * plain


def test_the_option_is_validated_everywhere(pack_path, tmp_path):
    from click.testing import CliRunner

    from nfed.cli import cli

    with pytest.raises(ConfigError, match="prox_mu"):
        FederationConfig(prox_mu=-1)
    with pytest.raises(ConfigError, match="prox_mu"):   # a set-up from the wire is checked by the client too
        train_round({}, {**make_round_setup(_tiny(), 1, 1), PROX_MU_KEY: float("nan")}, pack_path)
    for command in (["federate", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
                    ["demo", "--out", str(tmp_path / "demo")]):
        result = CliRunner().invoke(cli, [*command, "--prox-mu", "-1"])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --prox-mu -1") and "Traceback" not in result.output


def test_mu_reaches_the_clients_is_recorded_and_a_resume_cannot_change_it(tmp_path):
    seen = []

    def recording(global_weights, setup, pack_path, **kwargs):
        seen.append(setup.get(PROX_MU_KEY))
        return fake_train(global_weights, setup, pack_path)

    _run(tmp_path, train=recording, rounds=1, prox_mu=0.25)
    assert seen == [0.25] * len(PACKS)
    with pytest.raises(ConfigError, match="prox_mu 0.25 -> 0.5"):
        _run(tmp_path, train=recording, rounds=2, prox_mu=0.5, resume=True)
    _run(tmp_path, train=recording, rounds=2, prox_mu=0.25, resume=True)
    assert seen == [0.25] * 2 * len(PACKS)


def test_flower_run_config_carries_mu_and_old_apps_still_load(tmp_path):
    from nfed.federation.flower.config import run_config_for, settings_from_run_config

    nested = run_config_for(_tiny(), FederationConfig(prox_mu=0.5), run_dir=tmp_path)
    flat = {k: v for k, v in nested.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in nested["train"].items()})
    assert flat["prox-mu"] == 0.5
    assert settings_from_run_config(flat).federation_config.prox_mu == 0.5
    del flat["prox-mu"]   # an app written before FedProx
    assert settings_from_run_config(flat).federation_config.prox_mu == 0.0
