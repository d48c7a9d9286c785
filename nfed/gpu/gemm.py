"""The cuBLAS GEMM that every GPU convolution ends in, in the precision mode of nfed.gpu.precision, and the
bfloat16 packing its bf16 mode needs (float32 -> bfloat16 bits, round to nearest even, by kernels/im2col.cu).
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.gpu import kernels, precision

# Enum values of cublas_api.h / library_types.h, used only if CuPy's binding lacks the name.
_CUBLAS_FALLBACK = {
    "CUBLAS_OP_N": 0, "CUBLAS_OP_T": 1,
    "CUBLAS_POINTER_MODE_HOST": 0,
    "CUBLAS_COMPUTE_32F": 68, "CUBLAS_COMPUTE_32F_FAST_TF32": 77, "CUBLAS_COMPUTE_64F": 70,
    "CUBLAS_GEMM_DEFAULT": -1,
    "CUDA_R_32F": 0, "CUDA_R_64F": 1, "CUDA_R_16BF": 14,
}


def _cublas():
    backend.cupy_module()
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415 - GPU-only, loaded on first GEMM

    return cublas


def _const(cublas, name: str) -> int:
    value = getattr(cublas, name, None)
    if value is None:
        from cupy.cuda import runtime  # noqa: PLC0415

        value = getattr(runtime, name, _CUBLAS_FALLBACK[name])
    return int(value)


def _data_type(cublas, dtype) -> int:
    if dtype == np.float32:
        return _const(cublas, "CUDA_R_32F")
    if dtype == np.float64:
        return _const(cublas, "CUDA_R_64F")
    if dtype == np.uint16:  # bfloat16 bits, packed by kernels/im2col.cu
        return _const(cublas, "CUDA_R_16BF")
    raise TypeError(f"gemm: unsupported dtype {dtype}")


def _as_batched(a):
    """(pointer, rows, cols, batch stride in elements, batch count or None for a shared 2-D matrix)."""
    if a.ndim == 2:
        return a.data.ptr, a.shape[0], a.shape[1], 0, None
    if a.ndim == 3:
        return a.data.ptr, a.shape[1], a.shape[2], a.shape[1] * a.shape[2], a.shape[0]
    raise ValueError(f"gemm: operands must be 2-D or 3-D, got shape {a.shape}")


def gemm(a, b, *, trans_a: bool = False, trans_b: bool = False, out=None, alpha: float = 1.0,
         beta: float = 0.0, mode: str | None = None):
    """Row-major (batched) GEMM on cuBLAS: out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i].

    a, b: C-contiguous CuPy arrays, 2-D (shared by every batch entry) or 3-D [batch, rows, cols]; float32,
    float64, or uint16 holding bfloat16 bits (then the result is float32). In bf16 mode float32 operands
    are packed to bfloat16 here; in tf32 mode tensor cores are allowed. out: C-contiguous float array
    [batch, M, N] (or [M, N] when both operands are 2-D); allocated when None.
    """
    cp = backend.cupy_module()
    cublas = _cublas()
    mode = precision.get_precision() if mode is None else precision.parse_precision(mode)
    float64 = a.dtype == np.float64 or b.dtype == np.float64
    if float64 and (a.dtype != np.float64 or b.dtype != np.float64):
        raise TypeError("gemm: float64 operands must both be float64")
    if mode == "bf16" and not float64:
        a = float_to_bf16(a) if a.dtype == np.float32 else a
        b = float_to_bf16(b) if b.dtype == np.float32 else b
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: operand dtypes differ ({a.dtype} and {b.dtype})")
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("gemm: operands must be C-contiguous")
    a_ptr, ra, ca, stride_a, batch_a = _as_batched(a)
    b_ptr, rb, cb, stride_b, batch_b = _as_batched(b)
    m_rows, k_a = (ca, ra) if trans_a else (ra, ca)
    k_b, n_cols = (cb, rb) if trans_b else (rb, cb)
    if k_a != k_b:
        raise ValueError(f"gemm: inner dimensions differ ({k_a} and {k_b})")
    if batch_a is not None and batch_b is not None and batch_a != batch_b:
        raise ValueError(f"gemm: batch sizes differ ({batch_a} and {batch_b})")
    batch = batch_a if batch_a is not None else batch_b
    out_dtype = np.float64 if float64 else np.float32
    out_shape = (m_rows, n_cols) if batch is None else (batch, m_rows, n_cols)
    if out is None:
        out = (cp.empty if beta == 0.0 else cp.zeros)(out_shape, dtype=out_dtype)
    elif out.shape != out_shape or out.dtype != out_dtype or not out.flags.c_contiguous:
        raise ValueError(f"gemm: out must be C-contiguous {out_dtype.__name__} {out_shape}, "
                         f"got {out.dtype} {out.shape}")
    if m_rows == 0 or n_cols == 0 or (batch == 0):
        return out
    if k_a == 0:
        out *= beta
        return out

    in_type = _data_type(cublas, a.dtype)
    out_type = _data_type(cublas, out_dtype)
    if float64:
        compute = _const(cublas, "CUBLAS_COMPUTE_64F")
        scalar_dtype = np.float64
    else:
        compute = _const(cublas, "CUBLAS_COMPUTE_32F_FAST_TF32" if mode == "tf32" else "CUBLAS_COMPUTE_32F")
        scalar_dtype = np.float32
    alpha_host = np.array(alpha, dtype=scalar_dtype)
    beta_host = np.array(beta, dtype=scalar_dtype)
    op_n, op_t = _const(cublas, "CUBLAS_OP_N"), _const(cublas, "CUBLAS_OP_T")
    algo = _const(cublas, "CUBLAS_GEMM_DEFAULT")
    item_in = a.dtype.itemsize
    item_out = out.dtype.itemsize
    stride_c = m_rows * n_cols

    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T; a row-major matrix's memory is
    # its transpose in column-major terms, so B's memory goes first and the transposition flags carry over.
    with a.device:
        handle = cp.cuda.device.get_cublas_handle()
        pointer_mode = cublas.getPointerMode(handle)
        host_mode = _const(cublas, "CUBLAS_POINTER_MODE_HOST")
        if pointer_mode != host_mode:
            cublas.setPointerMode(handle, host_mode)
        try:
            def call(a_at, b_at, c_at, stride_a_, stride_b_, count):
                cublas.gemmStridedBatchedEx(
                    handle, op_t if trans_b else op_n, op_t if trans_a else op_n,
                    n_cols, m_rows, k_a,
                    alpha_host.ctypes.data,
                    b_at, in_type, cb, stride_b_,
                    a_at, in_type, ca, stride_a_,
                    beta_host.ctypes.data,
                    c_at, out_type, n_cols, stride_c,
                    count, compute, algo)

            if batch is None or (batch_a is not None and batch_b is not None):
                call(a_ptr, b_ptr, out.data.ptr, stride_a, stride_b, 1 if batch is None else batch)
            else:  # one operand shared by the whole batch: one plain GEMM per entry, no stride-0 batches
                for i in range(batch):
                    call(a_ptr + i * stride_a * item_in, b_ptr + i * stride_b * item_in,
                         out.data.ptr + i * stride_c * item_out, 0, 0, 1)
        finally:
            if pointer_mode != host_mode:
                cublas.setPointerMode(handle, pointer_mode)
    return out


def float_to_bf16(x):
    """float32 array -> uint16 array of bfloat16 bits (round to nearest even; NaN stays NaN)."""
    cp = backend.cupy_module()
    if x.dtype != np.float32:
        raise TypeError(f"float_to_bf16 needs float32, got {x.dtype}")
    x = kernels.contiguous(x)
    out = cp.empty(x.shape, dtype=np.uint16)
    if x.size:
        dev = kernels.device_index(x)
        kernels.launch("float_to_bf16", kernels.grid_1d(x.size, dev), (x, out, x.size), dev)
    return out


def bf16_to_float(bits):
    """uint16 bfloat16 bits -> float32 (exact): for tests and diagnostics."""
    xp = backend.array_module(bits)
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def bf16_mode(dtype) -> bool:
    """True when float32 GEMM operands of this dtype are packed to bfloat16 (the bf16 mode)."""
    return dtype == np.float32 and precision.get_precision() == "bf16"


def operand(a):
    """GEMM operand in the mode's storage: bf16 bits in bf16 mode, else the array itself."""
    return float_to_bf16(a) if bf16_mode(a.dtype) else a
