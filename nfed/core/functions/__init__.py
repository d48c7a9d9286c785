"""Differentiable operations on Tensors (raw arrays accepted as inputs): `from nfed import functions as F`.

One family per module: arithmetic, reduction, shape, activation, conv, pooling, normalization, loss, and
fused (conv -> batch norm -> ReLU in one op on the CPU).
Each op is a Function class with forward/backward on raw arrays plus a lowercase wrapper; the heavy ops
keep their raw-array compute in module-level functions (e.g. `conv.conv2d_forward`), each of which hands
CuPy arrays to its CUDA implementation in nfed.gpu at call time (nfed.core.dispatch).
"""
from nfed.core.functions.activation import log_softmax, relu, sigmoid, softmax
from nfed.core.functions.arithmetic import add, div, exp, log, mul, neg, pow, sub
from nfed.core.functions.conv import conv2d, conv_transpose2d
from nfed.core.functions.fused import conv_bn_relu
from nfed.core.functions.loss import bce_with_logits, cross_entropy, mse_loss, soft_dice_loss
from nfed.core.functions.normalization import batch_norm
from nfed.core.functions.pooling import max_pool2d
from nfed.core.functions.reduction import mean, sum
from nfed.core.functions.shape import concat, getitem, reshape, transpose

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log",
    "sum", "mean", "reshape", "transpose", "concat", "getitem",
    "relu", "sigmoid", "softmax", "log_softmax",
    "conv2d", "conv_transpose2d", "max_pool2d", "batch_norm", "conv_bn_relu",
    "cross_entropy", "mse_loss", "bce_with_logits", "soft_dice_loss",
]
