"""CUDA implementations of the core ops on CuPy arrays: kernels (the kernels/*.cu argument table, compile cache
and checked launches), gemm (cuBLAS GEMM and bf16 packing) in the mode of precision (fp32 | tf32 | bf16),
conv, pooling, batchnorm (+ fused ReLU), softmax (+ cross-entropy), optim (fused Adam/SGD updates) and fedavg
(the device running sum).

Called by nfed.core (and nfed.federation.aggregator) at call time when an op's arrays live on a GPU: nothing
here patches another module, and nothing here runs for NumPy arrays. May import nfed.common only. CuPy is
imported here and by nfed.common.backend, nowhere else, and only at the first GPU call.
"""
