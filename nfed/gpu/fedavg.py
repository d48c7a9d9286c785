"""FedAvg's running sum on the device (kernels/fedavg.cu): acc += weight * x in one pass, into a float64 sum
straight from float32 weights (no float64 copy of each client's model). Used by
nfed.federation.aggregator when the weights it averages are CuPy arrays."""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels


def weighted_accumulate(acc, x, weight):
    """acc += weight * x, in place: acc a contiguous float64 sum, x float32 or float64 of its shape."""
    if acc.shape != x.shape or not acc.flags.c_contiguous:
        raise ValueError("weighted_accumulate: shapes differ or the sum is not contiguous")
    if acc.dtype != np.float64 or x.dtype not in (np.float32, np.float64):
        raise backend.Unsupported(f"weighted_accumulate: {x.dtype} into {acc.dtype}")
    x = kernels.contiguous(x)
    name = "weighted_accumulate_f64" if x.dtype == np.float64 else "weighted_accumulate_f32_to_f64"
    if acc.size:
        dev = kernels.device_index(acc)
        kernels.launch(name, kernels.grid_1d(acc.size, dev), (acc, x, float(weight), acc.size), dev)
    return acc
