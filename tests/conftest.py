"""Shared test fixtures: devices to parametrise over, the real LEVIR-CD sample folder, temp packs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfed.common import backend

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("NFED_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


LEVIR_SAMPLES = _shared_dir() / "data" / "levir-cd-samples"

# One test body, every backend: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if backend.cupy_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def levir_dir() -> Path:
    """The real LEVIR-CD tiles in ../shared/data (skipped only when that folder is absent)."""
    if not LEVIR_SAMPLES.is_dir():
        pytest.skip(f"real LEVIR-CD samples not present at {LEVIR_SAMPLES}")
    return LEVIR_SAMPLES


@pytest.fixture
def incoming_grad_dtypes(monkeypatch):
    """(leaf dtype, dtype of the gradient the op's backward handed it) for every leaf gradient: autograd casts a
    leaf's gradient to the leaf's dtype, so .grad alone cannot show a backward that computes in float64."""
    from nfed.core import autograd

    seen = []
    real = autograd._accumulate_leaf

    def recording(leaf, grad):
        seen.append((leaf.data.dtype, grad.dtype))
        return real(leaf, grad)

    monkeypatch.setattr(autograd, "_accumulate_leaf", recording)
    return seen
