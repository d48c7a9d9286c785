"""Benchmark engines behind `nfed bench`: conv kernels, the training step, a federated round, the GPU suite.

Measurement code, never imported by the product's layers below it; may import all of them.
"""
