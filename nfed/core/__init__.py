"""Reverse-mode autodiff and what is built on it: the Tensor, the differentiable functions (conv, pooling,
normalisation, losses), layers, optimisers and metrics.

May import nfed.common and nfed.gpu (the GPU kernels, chosen per call by array type).
"""
