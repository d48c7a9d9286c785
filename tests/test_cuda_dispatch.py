"""nfed.gpu.ops.install() on any machine: every CPU function it replaces exists with the same parameters
(so a rename in the core cannot silently leave the GPU path unused), NumPy calls are untouched, and
uninstall() restores the originals."""
from __future__ import annotations

import importlib
import inspect

import numpy as np

from nfed.gpu import ops as cuda_ops


def test_every_dispatched_function_exists_with_the_gpu_signature():
    for module_name, names in cuda_ops.DISPATCH.items():
        module = importlib.import_module(module_name)
        for name in names:
            cpu = getattr(module, name, None)
            assert cpu is not None, f"{module_name}.{name} no longer exists"
            cpu_params = list(inspect.signature(cpu).parameters)
            gpu_params = list(inspect.signature(getattr(cuda_ops, name)).parameters)
            assert len(cpu_params) == len(gpu_params), (name, cpu_params, gpu_params)


def test_optimizers_keep_the_update_hook_and_state_names():
    from nfed.core import optim

    for cls, kinds in ((optim.Adam, ("exp_avg", "exp_avg_sq")), (optim.AdamW, ("exp_avg", "exp_avg_sq"))):
        assert cls.state_names == kinds
        assert list(inspect.signature(cls._update).parameters) == ["self", "name", "p", "grad"]
    assert list(inspect.signature(optim.SGD._update).parameters) == ["self", "name", "p", "grad"]


def test_install_leaves_numpy_calls_alone_and_uninstall_restores():
    from nfed.core.functions import conv

    original = conv.conv2d_forward
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    expected = original(x, w, None, 1, 1)
    cuda_ops.install()
    try:
        assert conv.conv2d_forward is not original and conv.conv2d_forward.cpu_function is original
        cuda_ops.install()  # idempotent
        np.testing.assert_array_equal(conv.conv2d_forward(x, w, None, 1, 1), expected)
    finally:
        cuda_ops.uninstall()
    assert conv.conv2d_forward is original and not cuda_ops.installed()
