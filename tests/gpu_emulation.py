"""Run nfed's GPU code paths on a CPU: kernels/*.cu compiled by the host C++ compiler, a NumPy-backed
stand-in for CuPy, and a NumPy model of cuBLAS's column-major strided-batched GEMM.

Only for tests (test_cuda_ops_emulated.py): it checks the kernels' index arithmetic, the argument lists
of every launch and the Python plumbing around them (chunking, reshapes, GEMM operand order, dispatch)
on machines without a GPU. Each emulated launch runs the kernel body once per (block, thread) in turn:
exact for kernels whose threads do not communicate, and for the block reductions when blockDim.x == 1
(every warp-shuffle partner is then absent), which is what the launcher uses for them. What it cannot
see (races, occupancy, speed, the real cuBLAS and NVRTC) is left to the gpu-marked tests on a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HOST_HEADER = r"""
#include <cmath>
#include <math.h>
#include <cstring>
struct nfed_dim3 { unsigned x = 1, y = 1, z = 1; };
extern "C" { nfed_dim3 blockIdx, threadIdx, blockDim, gridDim; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
static inline void __syncthreads() {}
template <typename T> static inline T __shfl_down_sync(unsigned, T, int) { return T(0); }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <typename T> static inline T nfed_host_atomic_add(T* p, T v) { T old = *p; *p += v; return old; }
#define atomicAdd nfed_host_atomic_add
using std::sqrt; using std::exp; using std::log;
extern "C" void nfed_set_index(unsigned bx, unsigned by, unsigned tx, unsigned bdx, unsigned gdx, unsigned gdy) {
    blockIdx.x = bx; blockIdx.y = by; threadIdx.x = tx; blockDim.x = bdx; gridDim.x = gdx; gridDim.y = gdy;
}
"""

REDUCTION_KERNELS = ("bn_partial", "bn_backward_partial", "channel_partial")
_SCALARS = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float,
            np.float64: ctypes.c_double, np.uint64: ctypes.c_uint64}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def build_host_kernels(kernels_dir: Path, out_dir: Path) -> dict[str, ctypes.CDLL]:
    """Compile every kernels/*.cu as a host shared library (two at a time)."""
    cxx = compiler()
    (out_dir / "cuda_host.h").write_text(HOST_HEADER)

    def build(source: Path):
        wrapper = out_dir / f"{source.stem}.cpp"
        wrapper.write_text(f'#include "cuda_host.h"\n#include "{source}"\n')
        library = out_dir / f"lib{source.stem}.so"
        run = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(library), str(wrapper)],
                             capture_output=True, text=True, timeout=300)
        if run.returncode:
            raise RuntimeError(f"host build of {source.name} failed:\n{run.stderr}")
        return source.name, library

    with ThreadPoolExecutor(max_workers=2) as pool:
        built = dict(pool.map(build, sorted(kernels_dir.glob("*.cu"))))
    return {name: ctypes.CDLL(str(path)) for name, path in built.items()}


# --- a NumPy stand-in for CuPy --------------------------------------------------------------------------

class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class _Device:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class EmulatedArray(np.ndarray):
    """What CuPy arrays offer that nfed uses: .data.ptr and .device."""

    @property
    def data(self):
        return _Pointer(self.ctypes.data)

    @property
    def device(self):
        return _Device()


def _wrap(value):
    if isinstance(value, np.ndarray) and not isinstance(value, EmulatedArray):
        return value.view(EmulatedArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


class _MemoryPool:
    def free_all_blocks(self):
        pass


class _MemoryHook:
    name = "hook"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Runtime:
    memcpyDeviceToDevice = 3

    @staticmethod
    def memcpyAsync(dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)

    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(index):
        return {"multiProcessorCount": 4, "name": b"emulated"}


def fake_cupy() -> types.ModuleType:
    module = types.ModuleType("emulated_cupy")

    def asarray(a, dtype=None):
        if isinstance(a, EmulatedArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(np.asarray(a), dtype=dtype, copy=True).view(EmulatedArray)

    def module_getattr(name):
        value = getattr(np, name)
        if isinstance(value, np.ufunc):  # keeps .at/.reduce; subclass inputs give subclass outputs
            return value
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: _wrap(value(*args, **kwargs))
        return value

    module.__getattr__ = module_getattr
    module.ndarray = EmulatedArray
    module.asarray = asarray
    module.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)
    module.get_default_memory_pool = _MemoryPool
    module.cuda = types.SimpleNamespace(
        Device=lambda index=0: _Device(), runtime=_Runtime, MemoryHook=_MemoryHook,
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    return module


# --- cuBLAS: column-major strided-batched GEMM in NumPy -------------------------------------------------------

_TYPES = {0: (np.float32, 4), 1: (np.float64, 8), 14: (np.uint16, 2)}  # CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF


def _matrix(ptr, data_type, rows, cols, ld):
    dtype, size = _TYPES[data_type]
    count = ld * (cols - 1) + rows
    flat = np.ctypeslib.as_array((ctypes.c_byte * (count * size)).from_address(ptr)).view(dtype)
    if data_type == 14:
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (4, ld * 4)).copy()
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (size, ld * size))


def _scalar(ptr, compute_type):
    ctype = ctypes.c_double if compute_type == 70 else ctypes.c_float  # CUBLAS_COMPUTE_64F
    return ctype.from_address(ptr).value


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, a, a_type, lda, stride_a, b, b_type, ldb,
                             stride_b, beta, c, c_type, ldc, stride_c, count, compute_type, algo):
    alpha, beta = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    size_a, size_c = _TYPES[a_type][1], _TYPES[c_type][1]
    for i in range(count):
        mat_a = _matrix(a + i * stride_a * size_a, a_type, *((m, k) if transa == 0 else (k, m)), lda)
        mat_b = _matrix(b + i * stride_b * size_a, b_type, *((k, n) if transb == 0 else (n, k)), ldb)
        mat_c = _matrix(c + i * stride_c * size_c, c_type, m, n, ldc)
        product = (mat_a if transa == 0 else mat_a.T) @ (mat_b if transb == 0 else mat_b.T)
        mat_c[...] = alpha * product + (beta * mat_c if beta != 0 else 0)


def fake_cublas() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_POINTER_MODE_HOST=0, CUBLAS_COMPUTE_32F=68,
        CUBLAS_COMPUTE_32F_FAST_TF32=77, CUBLAS_COMPUTE_64F=70, CUBLAS_GEMM_DEFAULT=-1,
        CUDA_R_32F=0, CUDA_R_64F=1, CUDA_R_16BF=14,
        getPointerMode=lambda handle: 0, setPointerMode=lambda handle, mode: None,
        gemmStridedBatchedEx=_gemm_strided_batched_ex)


# --- launches --------------------------------------------------------------------------------------------------

def emulated_kernel(libraries: dict[str, ctypes.CDLL], kernels: dict, name: str):
    """A callable with RawKernel's (grid, block, args) signature that runs the host-compiled kernel."""
    source, _ = kernels[name]
    library = libraries[source]
    function = getattr(library, name)

    def launch(grid, block, args):
        c_args = []
        for value in args:
            if isinstance(value, np.ndarray):
                c_args.append(ctypes.c_void_p(value.ctypes.data))
            else:
                c_args.append(_SCALARS[type(value)](value.item()))
        grid_x, grid_y = (tuple(grid) + (1, 1))[:2]
        if name.startswith(REDUCTION_KERNELS):
            threads = 1  # the partial-sum layout needs the real grid; one thread keeps the reduction exact
        else:  # grid-stride loops: any grid computes the same result
            grid_x, grid_y, threads = min(grid_x, 3), min(grid_y, 3), 2
        for by in range(grid_y):
            for bx in range(grid_x):
                for tx in range(threads):
                    library.nfed_set_index(bx, by, tx, threads, grid_x, grid_y)
                    function(*c_args)

    return launch


@contextlib.contextmanager
def emulated_gpu(libraries: dict[str, ctypes.CDLL]):
    """Make nfed.common.backend report one (emulated) GPU and route kernels and GEMMs to the emulation.

    Test-only patching of the machine (CuPy, cuBLAS, the compiled-kernel cache); nfed's ops then reach the
    GPU code exactly as on a real GPU: by their own call-time check of the array type."""
    from nfed.common import backend
    from nfed.gpu import gemm, kernels

    saved = (backend._cupy, backend.cupy_module, gemm._cublas, kernels.compiled_kernel)
    kernels.multiprocessors.cache_clear()
    cupy = fake_cupy()
    cublas = fake_cublas()
    backend._cupy = cupy
    backend.cupy_module = lambda: cupy
    gemm._cublas = lambda: cublas
    kernels.compiled_kernel = lambda name, device_index: emulated_kernel(libraries, kernels.KERNELS, name)
    try:
        yield cupy
    finally:
        backend._cupy, backend.cupy_module, gemm._cublas, kernels.compiled_kernel = saved
        kernels.multiprocessors.cache_clear()
