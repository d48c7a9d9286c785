"""Optimisers with PyTorch semantics: Adam, AdamW, SGD (momentum, Nesterov, weight decay).

State is keyed by parameter NAME ("exp_avg.enc.e1.conv1.weight"), so it can be checkpointed, restored into
a freshly built model and averaged across federated clients. Updates run in place on the parameters' raw
arrays, on whichever device they live: CuPy parameters take one fused kernel per parameter (nfed.gpu.optim,
given the parameter, gradient, state buffers and hyper-parameters), NumPy ones the element-wise code here.
"""
from __future__ import annotations

import contextlib

import numpy as np

from nfed.common import backend
from nfed.common.errors import CheckpointError
from nfed.core.functions.parallel import num_workers, run_blocks

# Parameter values from which a CPU step updates on the worker pool (below, the hand-off costs more).
PARALLEL_MIN_VALUES = 1 << 18

__all__ = ["Optimizer", "Adam", "AdamW", "SGD"]


class Optimizer:
    """Base class: holds (name, Parameter) pairs, the learning rate, the step count and per-name state."""

    state_names: tuple[str, ...] = ()

    def __init__(self, named_params, lr: float):
        self.params = []
        seen = set()
        for name, p in named_params:
            if name in seen:
                raise ValueError(f"duplicate parameter name '{name}'")
            seen.add(name)
            self.params.append((name, p))
        if not self.params:
            raise ValueError("optimizer got no parameters")
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.step_count = 0
        self.state: dict[str, dict[str, object]] = {kind: {} for kind in self.state_names}

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    def _buffer(self, kind: str, name: str, p):
        """The state array `kind` for parameter `name`, created as zeros on the parameter's device."""
        store = self.state[kind]
        buf = store.get(name)
        if buf is None or backend.is_gpu_array(buf) != backend.is_gpu_array(p.data):
            buf = (backend.array_module(p.data).zeros(p.data.shape, dtype=p.data.dtype) if buf is None
                   else backend.to_device(buf, backend.device_of(p.data)))
            store[name] = buf
        return buf

    def step(self) -> None:
        """One update of every parameter that has a gradient (parameters without one are left alone).
        NumPy parameters of PARALLEL_MIN_VALUES values or more in all are updated in groups on the CPU worker
        pool (each parameter's update is independent, so the result is the same)."""
        self.step_count += 1
        todo = [(name, p) for name, p in self.params if p.grad is not None]
        sizes = [p.data.size for _, p in todo]
        if sum(sizes) < PARALLEL_MIN_VALUES or any(backend.is_gpu_array(p.data) for _, p in todo):
            for name, p in todo:
                self._update(name, p, p.grad)
            return
        run_blocks(lambda group: [self._update(name, p, p.grad) for name, p in group],
                   _groups(todo, sizes, 2 * num_workers()))

    def _update(self, name, p, grad):  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Flat name -> array: "step" (int64 0-d) and "<kind>.<parameter name>" for every parameter
        (zeros where no step has touched it yet)."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for kind in self.state_names:
            for name, p in self.params:
                buf = self.state[kind].get(name)
                state[f"{kind}.{name}"] = (backend.array_module(p.data).zeros(p.data.shape, p.data.dtype)
                                           if buf is None else buf.copy())
        return state

    def load_state_dict(self, state) -> None:
        """Restore from `state_dict()` output; CheckpointError names missing, unexpected or mismatched keys."""
        expected = {"step"} | {f"{kind}.{name}" for kind in self.state_names for name, _ in self.params}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        shapes = {name: tuple(p.data.shape) for name, p in self.params}
        mismatched = [f"{kind}.{name}" for kind in self.state_names for name in shapes
                      if f"{kind}.{name}" in state and tuple(np.shape(state[f"{kind}.{name}"])) != shapes[name]]
        problems = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
                problems.append(f"{label} {shown}")
        if problems:
            raise CheckpointError(f"optimizer state does not match {type(self).__name__}: " + "; ".join(problems))
        self.step_count = int(np.asarray(backend.to_numpy(state["step"])))
        for kind in self.state_names:
            for name, p in self.params:
                xp = backend.array_module(p.data)
                value = state[f"{kind}.{name}"]
                if backend.is_gpu_array(value) != backend.is_gpu_array(p.data):
                    value = backend.to_device(value, backend.device_of(p.data))
                self.state[kind][name] = xp.array(value, dtype=p.data.dtype, copy=True)


def _groups(items, sizes, count: int) -> list[list]:
    """items split in order into about `count` runs of similar total size."""
    target = sum(sizes) / count
    groups, current, filled = [], [], 0
    for item, size in zip(items, sizes):
        current.append(item)
        filled += size
        if filled >= target:
            groups.append(current)
            current, filled = [], 0
    return groups + ([current] if current else [])


class Adam(Optimizer):
    """Adam (Kingma & Ba) as torch.optim.Adam: bias-corrected moments, eps added outside the square root,
    `weight_decay` as L2 added to the gradient."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, named_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(named_params, lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, grad):
        m = self._buffer("exp_avg", name, p)
        v = self._buffer("exp_avg_sq", name, p)
        if backend.is_gpu_array(p.data):
            from nfed.gpu import optim as gpu_optim  # noqa: PLC0415 - GPU only: importing nfed never loads CuPy

            with contextlib.suppress(backend.Unsupported):
                return gpu_optim.adam_update(p.data, grad, m, v, self.step_count, self.lr, self.betas, self.eps,
                                             self.weight_decay, self.decoupled)
        xp = backend.array_module(p.data)
        beta1, beta2 = self.betas
        data = p.data
        if self.weight_decay:
            if self.decoupled:
                data *= 1 - self.lr * self.weight_decay
            else:
                grad = grad + self.weight_decay * data
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * (grad * grad)
        t = self.step_count
        bias1 = 1 - beta1 ** t
        bias2_sqrt = (1 - beta2 ** t) ** 0.5
        denom = xp.sqrt(v)
        denom /= bias2_sqrt
        denom += self.eps
        data -= (self.lr / bias1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW): parameters shrink by lr*weight_decay per step."""

    decoupled = True

    def __init__(self, named_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(named_params, lr, betas, eps, weight_decay)


class SGD(Optimizer):
    """SGD as torch.optim.SGD (dampening 0): optional momentum, Nesterov momentum and L2 weight decay."""

    def __init__(self, named_params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.state_names = ("momentum_buffer",) if momentum else ()
        super().__init__(named_params, lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    def _update(self, name, p, grad):
        buffer = self._buffer("momentum_buffer", name, p) if self.momentum else None
        if backend.is_gpu_array(p.data):
            from nfed.gpu import optim as gpu_optim  # noqa: PLC0415 - GPU only: importing nfed never loads CuPy

            with contextlib.suppress(backend.Unsupported):
                return gpu_optim.sgd_update(p.data, grad, buffer, self.lr, self.momentum, self.weight_decay,
                                            self.nesterov)
        if self.weight_decay:
            grad = grad + self.weight_decay * p.data
        if self.momentum:
            buffer *= self.momentum  # zeros at the first step, so buf becomes grad there, as in PyTorch
            buffer += grad
            grad = grad + self.momentum * buffer if self.nesterov else buffer
        p.data -= self.lr * grad
