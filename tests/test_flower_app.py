"""The Flower app folder (nfed.federation.flower.appdir) and the allow-list file, without starting Flower."""
from __future__ import annotations

import importlib.util
import tomllib

import pytest

from nfed.common.errors import ConfigError
from nfed.federation.config import FederationConfig
from nfed.federation.flower.appdir import pyproject_text, write_flower_app
from nfed.federation.roster import read_allow_list
from nfed.training.trainer import TrainConfig


def test_the_app_names_the_components_every_written_app_names():
    """Apps written by earlier versions name these entry points: they must stay where they are."""
    components = tomllib.loads(pyproject_text({"rounds": 1}))["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "nfed.federation.flower:server_app",
                          "clientapp": "nfed.federation.flower:client_app"}


def test_without_flower_the_app_is_refused_in_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs Flower \(flwr 1.42\)"):
        write_flower_app(tmp_path / "app", TrainConfig(), FederationConfig(), run_dir=tmp_path / "run")
    assert not (tmp_path / "app").exists()


def test_allow_list_from_option_or_file(tmp_path):
    assert read_allow_list(None, None) is None
    assert read_allow_list(" Jung-gu, Mapo-gu ,", None) == ["Jung-gu", "Mapo-gu"]
    listed = tmp_path / "districts.txt"
    listed.write_text("# the pilot\nJung-gu\n\nMapo-gu  # joined in May\n", encoding="utf-8")
    assert read_allow_list(None, listed) == ["Jung-gu", "Mapo-gu"]
    with pytest.raises(ConfigError, match="give one of them"):
        read_allow_list("Jung-gu", listed)
    with pytest.raises(ConfigError, match="missing.txt not found"):
        read_allow_list(None, tmp_path / "missing.txt")
