"""How nfed's ops reach the GPU, checked on any machine: every op with a GPU implementation names one with its
parameters (so a rename cannot silently leave the GPU path unused), NumPy calls never touch it, importing nfed
loads no CuPy, and nothing in nfed patches another module's functions."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys

from conftest import REPO_ROOT

DISPATCHING_MODULES = ("nfed.core.functions.conv", "nfed.core.functions.pooling", "nfed.core.functions.normalization",
                       "nfed.core.functions.activation")


def dispatching_ops():
    """(module name, op name, op) for every op decorated with nfed.core.dispatch.gpu_implementation."""
    found = []
    for module_name in DISPATCHING_MODULES:
        module = importlib.import_module(module_name)
        found += [(module_name, name, op) for name, op in vars(module).items() if hasattr(op, "gpu_implementation")]
    return found


def test_every_gpu_implementation_exists_with_the_ops_parameters():
    ops = dispatching_ops()
    assert len(ops) == 17, [name for _, name, _ in ops]
    for module_name, name, op in ops:
        gpu_function = op.gpu_implementation()  # imports nfed.gpu.*, which needs no CuPy to import
        assert gpu_function.__module__.startswith("nfed.gpu."), (name, gpu_function)
        cpu_params = list(inspect.signature(op.array_agnostic).parameters)
        gpu_params = list(inspect.signature(gpu_function).parameters)
        assert len(gpu_params) >= len(cpu_params), (name, cpu_params, gpu_params)
        assert all(p.default is not inspect.Parameter.empty
                   for p in list(inspect.signature(gpu_function).parameters.values())[len(cpu_params):]), name


NUMPY_STEP = """
import sys
import numpy as np
import nfed.cli, nfed.federation.aggregator
from nfed.core import functions as F, optim
from nfed.core.autograd import Tensor
from nfed.federation.aggregator import fedavg
rng = np.random.default_rng(0)
x = Tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
w, gamma, beta = (Tensor(a, requires_grad=True) for a in (rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                                          np.ones(4, np.float32), np.zeros(4, np.float32)))
y = F.conv_bn_relu(x, w, None, gamma, beta, np.zeros(4, np.float32), np.ones(4, np.float32), True)
loss = F.cross_entropy(F.max_pool2d(y), rng.integers(0, 4, size=(2, 4, 4)))
loss.backward()
optim.Adam([("w", w), ("gamma", gamma), ("beta", beta)]).step()
fedavg([({"w": w.data}, 3), ({"w": w.data}, 1)])
print(",".join(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("cupy", "cupy_backends") or m.startswith("nfed.gpu."))))
"""


def test_importing_nfed_and_a_numpy_step_load_no_cupy_nor_gpu_code(tmp_path):
    stand_in = tmp_path / "cupy"  # importable here whether CuPy is installed or not: any import shows
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text('"""A stand-in for CuPy: nfed must not import it for NumPy work."""\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
    run = subprocess.run([sys.executable, "-c", NUMPY_STEP], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    loaded = set(filter(None, run.stdout.strip().split(",")))
    assert loaded <= {"nfed.gpu.precision"}, loaded  # precision: the --precision option's names, no CuPy


CTYPES_DECLARATIONS = ("restype", "argtypes")  # a C function's prototype, declared on the looked-up function


def patches(path) -> list[str]:
    """Where a file replaces an attribute of one of nfed's modules or classes: `setattr(module_or_class, ...)`
    or `module.name = ...` (ALL_CAPS settings such as fused.ENABLED aside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    owners = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)  # nfed's own modules and names
              if isinstance(node, ast.Import) for alias in node.names if alias.name.startswith("nfed")}
    owners |= {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nfed") for alias in node.names}
    owners |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    owners |= {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
               and getattr(node.value.func, "attr", getattr(node.value.func, "id", None))
               in ("import_module", "getattr")
               for target in node.targets if isinstance(target, ast.Name)}  # modules and classes looked up by name
    found = []

    def root(expression):
        while isinstance(expression, ast.Attribute):
            expression = expression.value
        return getattr(expression, "id", None)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                and getattr(node.args[0], "id", None) in owners:
            found.append(f"{path.name}:{node.lineno}: setattr({node.args[0].id}, ...)")
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute) and root(t.value) in owners and not t.attr.isupper() \
                        and t.attr not in CTYPES_DECLARATIONS:
                    found.append(f"{path.name}:{node.lineno}: assigns {root(t.value)}...{t.attr}")
    return found


def test_nothing_in_nfed_patches_functions(tmp_path):
    problems = [p for path in sorted((REPO_ROOT / "nfed").rglob("*.py")) for p in patches(path)]
    assert not problems, problems
    patched = tmp_path / "patched.py"  # what the check catches
    patched.write_text("from nfed.core import optim\nimport nfed.core.functions.conv as conv\n"
                       "class A:\n    pass\n"
                       "optim.Adam._update = None\nsetattr(conv, 'conv2d_forward', None)\nsetattr(A, 'f', None)\n"
                       "conv.conv2d_forward, x = None, 1\n"
                       "import importlib\nm = importlib.import_module('nfed.core.functions.pooling')\n"
                       "setattr(m, 'max_pool2d_forward', None)\n")
    assert len(patches(patched)) == 5
