"""The installed package finds its kernels/ and data/ files, ships its benchmarks (the PyTorch twin included)
and exposes the `nfed` command."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

import nfed
from nfed.common import resources


def test_kernel_sources_are_found():
    sources = sorted(p.name for p in resources.kernels_dir().glob("*.cu"))
    assert sources, f"no *.cu files in {resources.kernels_dir()}"


def test_data_files_are_found():
    assert resources.data_file("districts.csv").stat().st_size > 0
    assert resources.data_file("label_schema.json").stat().st_size > 0


def test_ci_tests_the_installed_package_not_the_checkout():
    """In CI (.ci/run does a plain `pip install .`) the package and its data come from site-packages."""
    if os.environ.get("CI") != "true":
        pytest.skip("checked in CI only (.ci/run installs the package non-editable); here nfed may be the checkout")
    package_dir = Path(nfed.__file__).resolve().parent
    assert REPO_ROOT not in package_dir.parents, f"tests imported nfed from the checkout: {package_dir}"
    assert resources.kernels_dir().parent == package_dir
    assert resources.data_dir().parent == package_dir
    twin = Path(importlib.util.find_spec("nfed.benchmarks.torch_twin").origin)
    assert twin.parent == package_dir / "benchmarks", twin


def test_a_plain_install_gets_every_package():
    """setup.cfg lists its packages by hand: a package folder missing from the list (nfed.federation.flower) would
    be left out of `pip install .` while every test of the checkout still passes."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    source = REPO_ROOT / "nfed"
    folders = {".".join(("nfed", *path.parent.relative_to(source).parts)) for path in source.rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "nfed.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout
    out = subprocess.run([sys.executable, "-m", "nfed.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and nfed.__version__ in out.stdout


@pytest.mark.slow
def test_a_wheel_ships_the_pytorch_twin_and_bench_step_uses_it(tmp_path):
    """Built from a copy of the sources and installed into a folder of its own, nfed (not the checkout) runs
    `nfed bench step` and, where torch is installed, measures the PyTorch reference with the twin it ships."""
    pytest.importorskip("setuptools", reason="building a wheel needs setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("nfed", "kernels", "data"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("nfed-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"nfed/benchmarks/torch_twin.py", "nfed/benchmarks/step.py", "nfed/benchmarks/isolated.py"} <= names
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import nfed; print(nfed.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).parent == site / "nfed"
    done = subprocess.run([sys.executable, "-m", "nfed.cli", "bench", "step", "--device", "cpu", "--width", "1",
                           "--tile", "32", "--batch", "1", "--repeat", "1", "--warmup", "0", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    if importlib.util.find_spec("torch") is None:
        assert report["ratio"] is None and report["reference_note"] == "PyTorch is not installed: pip install torch"
    else:
        assert report["ratio"] > 0 and report["reference_version"].startswith("torch "), report
