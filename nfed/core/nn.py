"""Layers with named parameters: Module, Parameter, Conv2d, ConvTranspose2d, BatchNorm2d, ReLU, MaxPool2d,
Sequential.

Parameters, sub-modules and buffers register themselves when assigned as attributes, in assignment order,
so every value gets a stable dotted name ("enc.e1.conv1.weight") that checkpoints, optimiser state and
federated averaging all key on. Initialisation follows PyTorch's defaults, drawn from a numpy Generator.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from nfed.common import backend
from nfed.common.errors import CheckpointError
from nfed.core import functions as F
from nfed.core.autograd import Tensor

__all__ = ["Parameter", "Module", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Sequential"]


class Parameter(Tensor):
    """A trainable tensor (requires_grad=True) that a Module registers by attribute name."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


def _short_list(names) -> str:
    names = list(names)
    shown = ", ".join(names[:6])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


class Module:
    """Base class: override `forward`; call the module to run it."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration -------------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning")
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            self.__dict__.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            self.__dict__.pop(name, None)
            modules[name] = value
        elif name in buffers:
            buffers[name] = value
        elif name in params or name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to '{name}': it holds a "
                                f"{'Parameter' if name in params else 'Module'}")
            params.pop(name, None)
            modules.pop(name, None)
            object.__setattr__(self, name, value)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when normal lookup fails: parameters, buffers and sub-modules live in dicts.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}'")

    def register_buffer(self, name: str, array) -> None:
        """Register non-trained state (e.g. BatchNorm running statistics): saved in state_dict, moved by to()."""
        if name in self._parameters or name in self._modules:
            raise KeyError(f"'{name}' is already a parameter or module")
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    # --- traversal ----------------------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(dotted name, module) for this module ("" or prefix) and every descendant, depth first."""
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            yield name, module
            children = [(f"{name}.{child}" if name else child, m) for child, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) in registration order, e.g. ("enc.e1.conv1.weight", p)."""
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, object]]:
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    def _named_state(self):
        """(dotted name, owning module, local name, kind) for every parameter and buffer."""
        for prefix, module in self.named_modules():
            for name in module._parameters:
                yield (f"{prefix}.{name}" if prefix else name), module, name, "parameter"
            for name in module._buffers:
                yield (f"{prefix}.{name}" if prefix else name), module, name, "buffer"

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """name -> raw array (a copy, on the module's device) for every parameter and buffer."""
        state = OrderedDict()
        for full, module, name, kind in self._named_state():
            value = module._parameters[name].data if kind == "parameter" else module._buffers[name]
            state[full] = value.copy()
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy values in by name; CheckpointError names missing, unexpected and shape-mismatched entries
        (with strict=False missing and unexpected names are ignored, shape mismatches still fail)."""
        entries = {full: (module, name, kind) for full, module, name, kind in self._named_state()}
        missing = [k for k in entries if k not in state]
        unexpected = [k for k in state if k not in entries]
        mismatched = []
        for full, (module, name, kind) in entries.items():
            if full in state:
                current = module._parameters[name].data if kind == "parameter" else module._buffers[name]
                if tuple(np.shape(state[full])) != tuple(current.shape):
                    mismatched.append(f"{full} (checkpoint {tuple(np.shape(state[full]))}, "
                                      f"model {tuple(current.shape)})")
        problems = []
        if strict and missing:
            problems.append(f"missing {_short_list(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected {_short_list(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch {_short_list(mismatched)}")
        if problems:
            raise CheckpointError(f"state does not match {type(self).__name__}: " + "; ".join(problems))
        for full, (module, name, kind) in entries.items():
            if full not in state:
                continue
            current = module._parameters[name].data if kind == "parameter" else module._buffers[name]
            xp = backend.array_module(current)
            value = state[full]
            if backend.is_gpu_array(value) != backend.is_gpu_array(current):
                value = backend.to_device(value, backend.device_of(current))
            current[...] = xp.asarray(value, dtype=current.dtype)

    # --- modes and devices --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Training mode (BatchNorm uses batch statistics) for this module and all descendants."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        """Evaluation mode (BatchNorm uses running statistics)."""
        return self.train(False)

    def to(self, device) -> "Module":
        """Move parameters, their gradients and buffers to `device` ('cpu', 'cuda:N' or a Device)."""
        device = backend.parse_device(device) if not isinstance(device, backend.Device) else device
        for m in self.modules():
            for p in m._parameters.values():
                p.data = backend.to_device(p.data, device)
                if p.grad is not None:
                    p.grad = backend.to_device(p.grad, device)
            for name, b in list(m._buffers.items()):
                m._buffers[name] = backend.to_device(b, device)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self) -> int:
        return sum(int(p.size) for p in self.parameters())

    # --- running --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _uniform(rng: np.random.Generator, shape, bound: float) -> Parameter:
    return Parameter(rng.uniform(-bound, bound, size=shape).astype(np.float32))


class _ConvLayer(Module):
    """Weight and bias of a (transposed) convolution, initialised like PyTorch: uniform +-1/sqrt(fan_in) with
    fan_in = weight.shape[1] * kh * kw for both layouts (as torch computes it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, bias: bool,
                 rng: np.random.Generator | None, transposed: bool):
        super().__init__()
        rng = np.random.default_rng() if rng is None else rng
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        shape = (in_channels, out_channels, kh, kw) if transposed else (out_channels, in_channels, kh, kw)
        bound = 1.0 / math.sqrt(shape[1] * kh * kw)
        self.weight = _uniform(rng, shape, bound)
        self.bias = _uniform(rng, (out_channels,), bound) if bias else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class Conv2d(_ConvLayer):
    """2-D convolution, weight [out, in, kh, kw]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 rng: np.random.Generator | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, rng, transposed=False)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ConvTranspose2d(_ConvLayer):
    """Transposed convolution, weight [in, out, kh, kw] (2x2 stride 2 by default: doubles H and W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=2, stride=2, bias: bool = True,
                 rng: np.random.Generator | None = None, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, rng, transposed=True)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding)


class BatchNorm2d(Module):
    """Batch normalisation over channels; parameters `weight` (gamma) and `bias` (beta), buffers
    `running_mean` and `running_var` (PyTorch names, no num_batches_tracked)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))

    def forward(self, x):
        return F.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
                            self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ..."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
