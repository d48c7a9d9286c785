"""Every test of test_cuda_ops.py again, on the CPU, against an emulated GPU (tests/gpu_emulation.py).

The kernels are compiled by the host C++ compiler and run thread by thread, cuBLAS is modelled in NumPy
and CuPy arrays are NumPy arrays, so the kernels' index arithmetic, the launch argument lists and the
GPU-side Python (chunking, GEMM operand order, dispatch, a W-Net-CD training step) are checked where no
GPU exists. Skipped only without a C++ compiler. The real-GPU run of the same bodies is test_cuda_ops.py.
"""
from __future__ import annotations

import gpu_emulation
import pytest
from test_cuda_ops import *  # noqa: F401,F403 - re-collect every test body under the emulation

from nfed.common.resources import kernels_dir

pytestmark = []  # not gpu-marked: runs on any machine with a C++ compiler


@pytest.fixture(scope="module", autouse=True)
def emulated_gpu(tmp_path_factory):
    if gpu_emulation.compiler() is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to build the emulated kernels")
    libraries = gpu_emulation.build_host_kernels(kernels_dir(), tmp_path_factory.mktemp("host_kernels"))
    with gpu_emulation.emulated_gpu(libraries):
        yield
