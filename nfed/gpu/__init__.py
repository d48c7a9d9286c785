"""CUDA implementations of the core ops on CuPy arrays: the compile/launch cache, GEMM and precision, conv,
pooling, batch norm, optimiser updates and FedAvg.

Called by nfed.core at call time when an op's arrays live on a GPU; nothing here patches another module.
May import nfed.common only. CuPy is imported here and by nfed.common.backend, nowhere else.
"""
