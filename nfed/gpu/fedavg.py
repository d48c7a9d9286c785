"""FedAvg's running sum on the device (kernels/fedavg.cu): acc += weight * x in one pass, into a float64 sum
straight from float32 weights (no float64 copy of each client's model). Used by
nfed.federation.aggregator when the weights it averages are CuPy arrays."""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels


def weighted_accumulate(acc, x, weight):
    """acc += weight * x, in place (streaming FedAvg as clients arrive); acc may be float64 for float32 x
    (a float64 running sum without a float64 copy of x)."""
    if acc.shape != x.shape or not acc.flags.c_contiguous:
        raise ValueError("weighted_accumulate: shapes differ or the sum is not contiguous")
    x = kernels.contiguous(x)
    if acc.dtype == x.dtype:
        name = f"weighted_accumulate_{kernels.dtype_suffix(acc.dtype)}"
    elif acc.dtype == np.float64 and x.dtype == np.float32:
        name = "weighted_accumulate_f32_to_f64"
    else:
        raise backend.Unsupported(f"weighted_accumulate: {x.dtype} into {acc.dtype}")
    if acc.size:
        dev = kernels.device_index(acc)
        kernels.launch(name, kernels.grid_1d(acc.size, dev), (acc, x, weight, acc.size), dev)
    return acc


