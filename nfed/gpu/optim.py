"""Fused optimiser updates on CuPy arrays (kernels/adam.cu): one kernel per parameter updates the parameter
and its state in place, instead of the half-dozen element-wise passes of the array-agnostic update.

The arguments are the update's whole input (parameter, gradient, state buffers, hyper-parameters, step), so
the caller (nfed.core.optim) owns the optimiser and its state. Parameters that are not contiguous float32 or
float64 arrays with a gradient of their dtype raise backend.Unsupported: the caller then runs its own update.
"""
from __future__ import annotations

from nfed.common import backend
from nfed.gpu import kernels


def _fusable(param, grad, *state):
    """The gradient as the kernel needs it (contiguous), or Unsupported when the kernel cannot take these."""
    if not (backend.is_gpu_array(param) and backend.is_gpu_array(grad) and param.flags.c_contiguous):
        raise backend.Unsupported("fused updates need contiguous CuPy parameters and gradients")
    kernels.dtype_suffix(param.dtype)
    for a in (grad,) + state:
        if a.dtype != param.dtype or a.shape != param.shape:
            raise backend.Unsupported("fused updates need a gradient and state of the parameter's shape and dtype")
    for a in state:
        if not a.flags.c_contiguous:
            raise backend.Unsupported("fused updates need contiguous state buffers")
    return kernels.contiguous(grad)


def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0, decoupled=False):
    """One Adam (AdamW when decoupled) step IN PLACE on param, exp_avg, exp_avg_sq; step >= 1."""
    grad = _fusable(param, grad, exp_avg, exp_avg_sq)
    beta1, beta2 = float(betas[0]), float(betas[1])
    if param.size:
        dev = kernels.device_index(param)
        kernels.launch(f"adam_update_{kernels.dtype_suffix(param.dtype)}", kernels.grid_1d(param.size, dev),
                       (param, grad, exp_avg, exp_avg_sq, param.size, float(lr), beta1, beta2, float(eps),
                        float(weight_decay), 1.0 - beta1 ** int(step), 1.0 - beta2 ** int(step),
                        int(bool(decoupled))), dev)


def sgd_update(param, grad, momentum_buffer, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """One SGD step IN PLACE (dampening 0; momentum_buffer None when momentum == 0). A zero momentum buffer
    becomes the gradient at the first step, as in PyTorch."""
    if momentum_buffer is None and momentum != 0.0:
        raise ValueError("sgd_update: momentum needs a momentum buffer")
    grad = _fusable(param, grad, *(() if momentum_buffer is None else (momentum_buffer,)))
    if param.size:
        dev = kernels.device_index(param)
        buffer = param if momentum_buffer is None else momentum_buffer  # not read when momentum == 0
        kernels.launch(f"sgd_update_{kernels.dtype_suffix(param.dtype)}", kernels.grid_1d(param.size, dev),
                       (param, grad, buffer, param.size, float(lr), float(momentum), 0.0, float(weight_decay),
                        int(bool(nesterov)), 0), dev)
