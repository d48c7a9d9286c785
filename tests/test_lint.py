"""The tree stays clean under ruff (configured in pyproject.toml: pyflakes, pycodestyle errors and warnings, 120
columns), where ruff is installed (the test extra installs it); skipped otherwise."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install ruff, or the test extra)")
    return [found, "check", "--no-cache", "--config", str(REPO_ROOT / "pyproject.toml")]


def test_the_tree_is_clean():
    done = subprocess.run([*_ruff(), "nfed", "tests", "bench"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_configuration_finds_what_it_should(tmp_path):
    """The rules are on: an unused import, an undefined name and a 121-column line are reported."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\nvalue = undefined\n" + "x = 1  # " + "-" * 112 + "\n")
    done = subprocess.run([*_ruff(), "--output-format", "concise", str(sample)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert {"F401", "F821", "E501"} <= {word for word in done.stdout.split() if word[:1] in "FE" and word[1:].isdigit()}
