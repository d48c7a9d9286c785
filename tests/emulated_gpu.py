"""pytest plugin: the whole session sees one emulated GPU (tests/gpu_emulation.py), so every gpu-marked test
of the suite runs on a CPU-only machine through the CUDA kernels (nfed's ops dispatch CuPy arrays to nfed.gpu):

    PYTHONPATH=tests pytest -p emulated_gpu -m gpu

A development check (CI runs the emulation through test_cuda_ops_emulated.py only); real GPUs run the
same tests without the plugin (bench/gpu_check.sh).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gpu_emulation

_session = None


def pytest_configure(config):
    global _session
    if gpu_emulation.compiler() is None:
        raise RuntimeError("the emulated GPU needs a host C++ compiler (g++ or clang++)")
    from nfed.common.resources import kernels_dir

    libraries = gpu_emulation.build_host_kernels(kernels_dir(), Path(tempfile.mkdtemp(prefix="nfed_emulated_gpu_")))
    _session = gpu_emulation.emulated_gpu(libraries)
    _session.__enter__()


def pytest_unconfigure(config):
    if _session is not None:
        _session.__exit__(None, None, None)
