"""Benchmark engines behind `nfed bench`: conv kernels (conv), the training step (step), a federated round
(round), the GPU suite; isolated runs a side in a fresh process; torch_twin is W-Net-CD in PyTorch, the reference
(importing it needs torch: without it, NfedError).

Measurement code, never imported by the product's layers below it; may import all of them.
"""
