"""Issue 27, item 1: each field of FederationConfig and TrainConfig is declared once (nfed.common.fields.option),
and the commands' options, LIMITS and the Flower run-config keys are generated from that declaration, so their
names, defaults and ranges cannot disagree."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from nfed.cli import cli
from nfed.common.errors import ConfigError
from nfed.federation.config import FederationConfig
from nfed.training.trainer import TrainConfig, profile_config

COMMANDS_DIR = Path(__file__).resolve().parents[1] / "nfed" / "commands"
# The command modules whose options are config fields (the benchmarks', adapt's and predict's --rounds, --width or
# --batch-size are their own).
CONFIG_COMMANDS = ("federation.py", "flower.py", "demo.py", "study.py", "options.py")
CONFIGS = (FederationConfig, TrainConfig)
# Keys of the first Flower app version: an app written then has them all; every key added later is optional.
FIRST_FLOWER_KEYS = {"rounds", "local-epochs", "eps", "patience-rounds", "delta", "deadline", "fraction",
                     "min-clients", "server-opt", "server-lr", "server-momentum", "seed", "evaluate-rounds"}
FEDERATE_ONLY = {"workers", "gpus", "client_state", "simulate_attack", "attackers", "hold_out"}
FLOWER_ONLY = {"secure_aggregation", "secagg_range"}


def command(name: str) -> click.Command:
    return cli.get_command(None, name)


def params(name: str) -> dict[str, click.Parameter]:
    return {param.opts[0]: param for param in command(name).params if param.opts}


def _capture_federate(monkeypatch, tmp_path, *args) -> tuple:
    """(FederationConfig, TrainConfig) `nfed federate --data D --out R ARGS` would run with."""
    import nfed.federation.server
    import nfed.runs.packs

    seen = {}

    def fake_federate(packs, run_dir, train_config, config, **_):
        seen.update(train=train_config, config=config)
        return SimpleNamespace(results=[])

    monkeypatch.setattr(nfed.runs.packs, "find_packs", lambda folder: {"A-gu": Path(folder) / "A-gu.h5"})
    monkeypatch.setattr(nfed.federation.server, "federate", fake_federate)
    result = CliRunner().invoke(cli, ["federate", "--data", str(tmp_path / "packs"), "--out", str(tmp_path / "run"),
                                      *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["config"], seen["train"]


def _capture_flower_app(monkeypatch, tmp_path, *args) -> tuple:
    """(FederationConfig, TrainConfig) `nfed flower-app --out APP ARGS` would write."""
    import nfed.federation.flower.appdir

    seen = {}

    def fake_write(app_dir, train_config, config, **_):
        seen.update(train=train_config, config=config)
        return Path(app_dir) / "pyproject.toml"

    monkeypatch.setattr(nfed.federation.flower.appdir, "write_flower_app", fake_write)
    result = CliRunner().invoke(cli, ["flower-app", "--out", str(tmp_path / "app"), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["config"], seen["train"]


# ------------------------------------------------------------------------------------------ defaults

def test_federate_without_options_runs_the_dataclass_defaults(monkeypatch, tmp_path):
    """One default per field: `nfed federate` with no option builds FederationConfig() (eps was 1e-3 on the
    command line and 0 in the dataclass) and the demo profile's TrainConfig."""
    config, train = _capture_federate(monkeypatch, tmp_path)
    assert config == FederationConfig()
    assert config.eps == 1e-3
    assert train == profile_config("demo")


def test_flower_app_without_options_writes_the_dataclass_defaults(monkeypatch, tmp_path):
    """The same for `nfed flower-app`, but for its own --deadline (Flower's: 600 s, 0 waits for every node)."""
    config, train = _capture_flower_app(monkeypatch, tmp_path)
    assert config == dataclasses.replace(FederationConfig(), deadline=600.0)
    assert train == profile_config("demo")


def test_options_reach_the_configs(monkeypatch, tmp_path):
    config, train = _capture_federate(monkeypatch, tmp_path, "--eps", "0", "--local-epochs", "2", "--no-round-eval",
                                      "--gpus", "0", "--seed", "7", "--lr", "0.01", "--aggregator", "median",
                                      "--dp-delta", "0.5", "--client-state", "keep", "--prox-mu", "0.5",
                                      "--device", "cpu")
    assert (config.eps, config.local_epochs, config.evaluate_rounds, config.gpus, config.seed) == (0, 2, False, (0,), 7)
    assert (config.aggregator, config.dp_delta, config.client_state, config.prox_mu) == ("median", 0.5, "keep", 0.5)
    assert (train.seed, train.lr, train.width) == (7, 0.01, profile_config("demo").width)
    config, _ = _capture_flower_app(monkeypatch, tmp_path, "--deadline", "0", "--secure-aggregation")
    assert config.deadline is None and config.secure_aggregation


# ------------------------------------------------------------------------------------------ the declarations

def test_every_field_is_declared_and_an_undeclared_one_fails():
    from nfed.common.fields import declared, declared_fields, option

    for cls in CONFIGS:
        assert all(found is not None for _, found in declared_fields(cls)), cls
    with pytest.raises(TypeError, match="Bad.forgotten is not declared"):
        @declared
        @dataclasses.dataclass
        class Bad:
            known: int = option(1, help="declared")
            forgotten: int = 2


def test_a_limit_declared_twice_differently_fails():
    from nfed.common.fields import declared, option
    from nfed.common.validate import Limit

    with pytest.raises(TypeError, match="disagrees"):
        @declared
        @dataclasses.dataclass
        class Clash:
            rounds: int = option(1, limit=Limit(0, 5, integer=True))


def test_limits_are_the_declared_ones():
    """Every numeric field declares a range, and LIMITS (the number checks) holds exactly that range."""
    from nfed.common.fields import declared_fields, value_type
    from nfed.common.validate import LIMITS, check_number

    for cls in CONFIGS:
        for field, found in declared_fields(cls):
            if value_type(cls, field.name) in (int, float) and not found.choices:
                assert found.limit is not None, field.name
                assert LIMITS[field.name] == found.limit, field.name
    with pytest.raises(ConfigError, match="must be"):
        check_number("eps", 2.0)


@pytest.mark.parametrize("name, only, missing", [
    ("federate", set(), FLOWER_ONLY),
    ("flower-app", set(), FEDERATE_ONLY),
])
def test_federation_options_are_the_declared_fields(name, only, missing):
    """Each declared option of FederationConfig is on federate / flower-app with the declared type, range,
    choices and default (flower-app's --deadline is Flower's own: 0 waits for every node)."""
    from nfed.commands.options import LimitedNumber
    from nfed.common.fields import declared_fields, value_type

    options = params(name)
    for field, found in declared_fields(FederationConfig):
        if found.cli is None or field.name in missing:
            assert found.cli not in options, field.name
            continue
        param = options[found.cli]
        if name == "flower-app" and field.name == "deadline":
            assert param.default == 600.0 and param.type.limit.low == 0 and not param.type.limit.low_open
            continue
        assert param.name == field.name and param.help == found.help
        if value_type(FederationConfig, field.name) is bool:
            assert param.is_flag and param.default is False
        elif found.parse is None:
            assert param.default == field.default, field.name
        if found.limit is not None:
            assert isinstance(param.type, LimitedNumber) and param.type.limit == found.limit
        if found.choices:
            assert list(param.type.choices) == [str(choice) for choice in found.choices]


@pytest.mark.parametrize("name", ["train-local", "train-central", "personalise"])
def test_training_options_are_the_declared_fields(name):
    """Every TrainConfig field with an option is a profile override (default None) of the declared range."""
    from nfed.common.fields import declared_fields

    options = params(name)
    assert options["--profile"].default == "demo"
    for field, found in declared_fields(TrainConfig):
        if found.cli is None:
            continue
        param = options[found.cli]
        assert param.name == field.name and param.help == found.help
        assert param.default in (None, False)
        if found.limit is not None:
            assert param.type.limit == found.limit


def test_demo_options_are_the_declared_ones():
    """The demo's federation and training options have the fields' names and ranges (defaults: DemoSettings')."""
    from nfed.common.fields import declared_fields

    options = params("demo")
    for cls in CONFIGS:
        for field, found in declared_fields(cls):
            if found.cli in options and found.limit is not None:
                assert options[found.cli].type.limit == found.limit, field.name
    assert {"--rounds", "--local-epochs", "--prox-mu", "--lr", "--epochs", "--seed"} <= set(options)


def test_flower_keys_are_the_declared_ones():
    """FEDERATION_KEYS and OPTIONAL_KEYS come from the declarations; every key added after the first Flower
    version is optional (apps written before it still load)."""
    from nfed.common.fields import declared_fields, value_type
    from nfed.federation.flower.config import FEDERATION_KEYS, OPTIONAL_KEYS

    declared = {found.flower_key: (field.name, value_type(FederationConfig, field.name))
                for field, found in declared_fields(FederationConfig) if found.flower_key}
    assert FEDERATION_KEYS == declared
    assert FIRST_FLOWER_KEYS <= set(FEDERATION_KEYS)
    assert set(OPTIONAL_KEYS) == set(FEDERATION_KEYS) - FIRST_FLOWER_KEYS


def test_a_first_version_flower_run_config_still_loads(tmp_path):
    """A run config holding only the first version's keys loads with every later field at its default."""
    from nfed.federation.flower.config import OPTIONAL_KEYS, run_config_for, settings_from_run_config

    nested = run_config_for(TrainConfig(), FederationConfig(eps=0.0), run_dir=tmp_path)
    flat = {key: value for key, value in nested.items() if key != "train" and key not in OPTIONAL_KEYS}
    flat.update({f"train.{key}": value for key, value in nested["train"].items()})
    settings = settings_from_run_config(flat)
    assert settings.federation_config == FederationConfig(eps=0.0)


# ------------------------------------------------------------------------------------------ shared options

@pytest.mark.parametrize("name, folder", [("federate", "--out"), ("flower-app", "--run-dir")])
def test_resume_and_overwrite_are_one_shared_pair(name, folder, tmp_path):
    args = ["--data", str(tmp_path)] if name == "federate" else []
    result = CliRunner().invoke(cli, [name, *args, "--out", str(tmp_path / "o"), "--resume", "--overwrite"])
    assert result.exit_code == 1 and f"--resume continues the run in {folder}" in result.output, result.output
    assert params(name)["--resume"].help == f"continue the run in {folder} from its last finished round"


# ------------------------------------------------------------------------------------------ in the source

def test_no_command_module_repeats_a_declared_field():
    """Best effort, in the source: no command module defines a declared field's option by hand
    (`click.option("--local-epochs"`) or copies it keyword by keyword (`local_epochs=local_epochs`)."""
    from nfed.common.fields import declared_fields

    found = []
    for path in (COMMANDS_DIR / name for name in CONFIG_COMMANDS):
        text = path.read_text(encoding="utf-8")
        for cls in CONFIGS:
            for field, declared in declared_fields(cls):
                if declared.cli and re.search(r'click\.option\(\s*"' + re.escape(declared.cli) + '"', text):
                    if not (path.name == "flower.py" and declared.cli == "--deadline"):
                        found.append(f"{path.name}: option {declared.cli}")
                if re.search(rf"\b{field.name}={field.name}\b", text):
                    found.append(f"{path.name}: {field.name}={field.name}")
    assert not found, found


def test_every_command_loads_on_its_own_before_any_config_module():
    """A command module that asks for a field's range when it loads (bench round: --min-clients, --rounds) must not
    depend on another module having imported the config classes first (a fresh process, like the CLI's)."""
    import subprocess
    import sys

    for args in (["-c", "import nfed.commands.bench_round"], ["-m", "nfed.cli", "bench", "round", "--help"]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
