"""Flower in its own package (issue 27, item 5): app folders written before the move still load, and the modules
that need no Flower import without it."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

# pyproject.toml's components as the previous version (nfed/federation/flower_app.py) wrote them
OLD_PYPROJECT = "\n".join((
    "# Written by `nfed flower-app`: a Flower app whose ServerApp and ClientApp are nfed's (nfed.federation.flower).",
    "[project]", 'name = "nfed-flower"', 'version = "0.1.0"',
    'dependencies = ["flwr>=1.42,<1.43", "nfed[flower]==0.1.0"]', "",
    "[tool.flwr.app]", 'publisher = "nfed"', "",
    "[tool.flwr.app.components]",
    'serverapp = "nfed.federation.flower:server_app"',
    'clientapp = "nfed.federation.flower:client_app"', "",
    "[tool.flwr.app.config]", "rounds = 2", ""))


def test_an_app_folder_of_the_previous_version_still_loads(tmp_path):
    pytest.importorskip("flwr")
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app, validate

    from nfed.federation.flower import app

    (tmp_path / "pyproject.toml").write_text(OLD_PYPROJECT)
    components = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    expected = {"serverapp": (app.server_app, ServerApp), "clientapp": (app.client_app, ClientApp)}
    for name, reference in components.items():
        assert validate(reference, check_module=True, project_dir=tmp_path) == (True, None)   # flwr run's check
        loaded = load_app(reference, ValueError, tmp_path)
        assert loaded is expected[name][0] and isinstance(loaded, expected[name][1])


def test_the_package_refuses_other_names():
    import nfed.federation.flower as flower

    with pytest.raises(AttributeError, match="no attribute 'serve'"):
        flower.serve


def test_the_app_folder_writer_run_config_and_gateway_need_no_flower():
    blocked = ("import sys; sys.modules['flwr'] = None; "
               "import nfed.federation.flower.appdir, nfed.federation.flower.config, nfed.federation.flower.gateway; "
               "import nfed.federation.flower as f; print(sorted(f.__all__))")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['client_app', 'server_app']"
