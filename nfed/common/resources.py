"""Locate the files nfed ships: CUDA sources (kernels/) and reference data (data/).

Installed, they live inside the package as `nfed/kernels` and `nfed/resources` (setup.cfg maps them);
run from a checkout, they are the top-level `kernels/` and `data/` folders. Both ways must work.
"""
from __future__ import annotations

from pathlib import Path

from nfed.common.errors import NfedError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise NfedError(f"nfed installation is incomplete: none of {', '.join(map(str, candidates))} exists")


def kernels_dir() -> Path:
    """Folder holding the CUDA C sources (*.cu) loaded by nfed.common.backend."""
    return _first_existing(_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels")


def data_dir() -> Path:
    """Folder holding districts.csv, the label JSON schema and small fixtures."""
    return _first_existing(_PACKAGE_DIR / "resources", _PACKAGE_DIR.parent / "data")


def data_file(name: str) -> Path:
    """Path of one shipped data file; a clear error if the installation lacks it."""
    path = data_dir() / name
    if not path.is_file():
        raise NfedError(f"nfed installation is incomplete: {path} is missing")
    return path


def kernel_source(name: str) -> str:
    """Text of one CUDA source file from kernels/."""
    path = kernels_dir() / name
    if not path.is_file():
        raise NfedError(f"nfed installation is incomplete: kernel source {path} is missing")
    return path.read_text(encoding="utf-8")
