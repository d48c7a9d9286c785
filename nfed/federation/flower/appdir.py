"""The Flower app folder that `nfed flower-app` writes: one pyproject.toml whose [tool.flwr.app.components] name
nfed.federation.flower's ServerApp and ClientApp (nfed.federation.flower.app's; the code lives in the installed nfed
package on every machine)
and whose [tool.flwr.app.config] holds the federation set-up (nfed.federation.flower.config), overridable per run
with `flwr run APP_DIR CONNECTION --run-config 'rounds=5'`.

The components are the same names since the first written apps, so every app folder written so far still runs.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from nfed import __version__
from nfed.common.atomic import write_text_atomic
from nfed.common.errors import ConfigError
from nfed.federation.flower.config import run_config_for

APP_NAME = "nfed-flower"
PUBLISHER = "nfed"
FLWR_REQUIREMENT = "flwr>=1.42,<1.43"


def toml_value(value) -> str:
    """A TOML literal for a str, bool, int or float (JSON string escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) into a Flower run config")


def pyproject_text(run_config: dict) -> str:
    """pyproject.toml of the Flower app: metadata, components and the (one level nested) run config."""
    lines = [
        "# Written by `nfed flower-app`: a Flower app whose ServerApp and ClientApp are nfed's "
        "(nfed.federation.flower).",
        "# Every machine (SuperLink and each SuperNode) needs nfed with its flower extra; start the SuperLink",
        "# with --disable-runtime-dependency-installation so Flower uses that installation as it is.",
        "[project]",
        f"name = {toml_value(APP_NAME)}",
        f"version = {toml_value(__version__)}",
        'description = "nfed: federated building-change detection (W-Net-CD, FedAvg) over Flower"',
        'license = "MIT"',
        f"dependencies = [{toml_value(FLWR_REQUIREMENT)}, {toml_value('nfed[flower]==' + __version__)}]",
        "",
        "[tool.flwr.app]",
        f"publisher = {toml_value(PUBLISHER)}",
        "",
        "[tool.flwr.app.components]",
        'serverapp = "nfed.federation.flower:server_app"',
        'clientapp = "nfed.federation.flower:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    tables = {key: value for key, value in run_config.items() if isinstance(value, dict)}
    lines += [f"{key} = {toml_value(value)}" for key, value in run_config.items() if key not in tables]
    for table, values in tables.items():
        lines += ["", f"[tool.flwr.app.config.{table}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_flower_app(app_dir: Path, train_config, fed_config, **options) -> Path:
    """Write APP_DIR/pyproject.toml for a TrainConfig + FederationConfig (`options`: run_config_for's)
    atomically; returns its path. Flower must be installed here: the app is no use where it is not."""
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError("nfed flower-app needs Flower (flwr 1.42): install nfed with its flower extra, e.g. "
                          "pip install '/path/to/nfed[flower]' or 'nfed-0.1.0-py3-none-any.whl[flower]'")
    run_config = run_config_for(train_config, fed_config, **options)
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    path = app_dir / "pyproject.toml"
    write_text_atomic(path, pyproject_text(run_config))
    return path
