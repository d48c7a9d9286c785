// Batch normalisation over NCHW (per-channel statistics over N, H, W), optionally fused with ReLU.
//
// Training forward = bn_partial_sums -> bn_finalize_stats -> bn_forward_apply.
//   * bn_partial_sums: grid (S, C); block (s, c) sums (x - shift_c) and (x - shift_c)^2 over a strided
//     share of channel c, where shift_c = x[0, c, 0, 0].  The shift keeps the one-pass variance accurate
//     when |mean| >> std (the "shifted data" algorithm), so x is read only once for the statistics.
//   * bn_finalize_stats: one thread per channel adds the S partials in double, writes mean, the biased
//     variance and 1/sqrt(var + eps) and, when asked, updates running_mean/running_var in place with the
//     unbiased variance and the given momentum (PyTorch semantics).
//   * bn_forward_apply: y = (x - mean) * invstd * gamma + beta, then max(y, 0) when relu != 0; also
//     writes xhat = (x - mean) * invstd when xhat_out is not null (for callers that keep xhat).
// Backward (training) = bn_backward_partial_sums -> (host: add the S partials) -> bn_backward_apply:
//   g = gy * [y > 0] (fused ReLU; y recomputed from x, so only x is kept for backward),
//   the saved input is x (input_is_xhat = 0) or xhat itself (input_is_xhat = 1, no ReLU then),
//   dbeta = sum g, dgamma = sum g * xhat,
//   gx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)        (training, M = N*H*W)
//   gx = gamma * invstd * g                                          (eval: statistics are constants)
// Grids for the apply kernels: y over the N*C planes, x over the H*W pixels of a plane.

template <typename T>
__device__ __forceinline__ T nfed_warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Sums two values over the block; thread 0 gets the totals. blockDim.x must be a multiple of 32 (<= 1024).
template <typename T>
__device__ __forceinline__ void nfed_block_sum2(T& a, T& b) {
    __shared__ T shared_a[32];
    __shared__ T shared_b[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    a = nfed_warp_sum(a);
    b = nfed_warp_sum(b);
    if (lane == 0) { shared_a[warp] = a; shared_b[warp] = b; }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        a = lane < warps ? shared_a[lane] : (T)0;
        b = lane < warps ? shared_b[lane] : (T)0;
        a = nfed_warp_sum(a);
        b = nfed_warp_sum(b);
    }
}

// The shared shape of every per-channel reduction: block (s, c) walks its strided share of channel c's
// N*HW elements, accumulates the two values `term` returns for each element index, reduces them over
// the block and writes them to partial[c, s, 0..1].
template <typename T, typename Term>
__device__ void nfed_channel_partial_sums2(int N, int C, int HW, T* __restrict__ partial, Term term) {
    const int c = blockIdx.y;
    const int S = gridDim.x;
    const long long M = (long long)N * HW;
    T a = 0, b = 0;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < M; e += (long long)S * blockDim.x) {
        const long long n = e / HW;
        term((n * C + c) * HW + (e - n * HW), a, b);
    }
    nfed_block_sum2(a, b);
    if (threadIdx.x == 0) {
        partial[((long long)c * S + blockIdx.x) * 2 + 0] = a;
        partial[((long long)c * S + blockIdx.x) * 2 + 1] = b;
    }
}

// (x - shift, (x - shift)^2) with shift = the channel's first value.
template <typename T>
struct NfedShiftedMoments {
    const T* x;
    T shift;
    __device__ void operator()(long long idx, T& sum, T& sumsq) const {
        const T d = x[idx] - shift;
        sum += d;
        sumsq += d * d;
    }
};

template <typename T>
__device__ void bn_partial_sums_NCHW(const T* __restrict__ x, int N, int C, int HW, T* __restrict__ partial) {
    const NfedShiftedMoments<T> term{x, x[(long long)blockIdx.y * HW]};
    nfed_channel_partial_sums2(N, C, HW, partial, term);
}

template <typename T>
__device__ void bn_finalize_stats(const T* __restrict__ partial, const T* __restrict__ x, int C, int S, int HW,
                                  long long M, double momentum, double eps, int update_running,
                                  T* __restrict__ running_mean, T* __restrict__ running_var,
                                  T* __restrict__ mean_out, T* __restrict__ var_out,
                                  T* __restrict__ invstd_out) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
        double sum = 0.0, sumsq = 0.0;
        for (int s = 0; s < S; ++s) {
            sum += (double)partial[((long long)c * S + s) * 2 + 0];
            sumsq += (double)partial[((long long)c * S + s) * 2 + 1];
        }
        const double shift = (double)x[(long long)c * HW];
        const double mean_shifted = sum / (double)M;
        double var = sumsq / (double)M - mean_shifted * mean_shifted;
        if (var < 0.0) var = 0.0;
        const double mean = shift + mean_shifted;
        mean_out[c] = (T)mean;
        var_out[c] = (T)var;
        invstd_out[c] = (T)(1.0 / sqrt(var + eps));
        if (update_running) {
            const double unbiased = M > 1 ? var * (double)M / (double)(M - 1) : var;
            running_mean[c] = (T)((1.0 - momentum) * (double)running_mean[c] + momentum * mean);
            running_var[c] = (T)((1.0 - momentum) * (double)running_var[c] + momentum * unbiased);
        }
    }
}

template <typename T>
__device__ void bn_forward_apply_NCHW(const T* __restrict__ x, const T* __restrict__ mean,
                                      const T* __restrict__ invstd, const T* __restrict__ gamma,
                                      const T* __restrict__ beta, T* __restrict__ y,
                                      T* __restrict__ xhat_out, int N, int C, int HW, int relu) {
    for (long long plane = blockIdx.y; plane < (long long)N * C; plane += gridDim.y) {
        const int c = (int)(plane % C);
        const T scale = gamma[c] * invstd[c];
        const T offset = beta[c] - mean[c] * scale;
        const T m = mean[c];
        const T is = invstd[c];
        const T* __restrict__ xin = x + plane * HW;
        T* __restrict__ out = y + plane * HW;
        T* __restrict__ xhat = xhat_out != nullptr ? xhat_out + plane * HW : nullptr;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < HW; q += blockDim.x * gridDim.x) {
            const T xv = xin[q];
            T v = xv * scale + offset;
            if (relu && !(v > (T)0)) v = (T)0;
            out[q] = v;
            if (xhat != nullptr) xhat[q] = (xv - m) * is;
        }
    }
}

// (g, g * xhat) with g = gy, masked by the recomputed ReLU when relu != 0; the saved input is x, or
// xhat itself when input_is_xhat (no ReLU then).
template <typename T>
struct NfedBackwardTerms {
    const T* gy;
    const T* x;
    T mean, invstd, scale, offset;
    int relu, input_is_xhat;
    __device__ void operator()(long long idx, T& sum_g, T& sum_gx) const {
        const T xv = x[idx];
        const T xhat = input_is_xhat ? xv : (xv - mean) * invstd;
        T g = gy[idx];
        if (relu && !(xv * scale + offset > (T)0)) g = (T)0;  // same expression as bn_forward_apply
        sum_g += g;
        sum_gx += g * xhat;
    }
};

template <typename T>
__device__ void bn_backward_partial_sums_NCHW(const T* __restrict__ gy, const T* __restrict__ x,
                                              const T* __restrict__ mean, const T* __restrict__ invstd,
                                              const T* __restrict__ gamma, const T* __restrict__ beta,
                                              int N, int C, int HW, int relu, int input_is_xhat,
                                              T* __restrict__ partial) {
    const int c = blockIdx.y;
    const T scale = gamma[c] * invstd[c];
    const NfedBackwardTerms<T> term{gy, x, mean[c], invstd[c], scale, beta[c] - mean[c] * scale, relu,
                                    input_is_xhat};
    nfed_channel_partial_sums2(N, C, HW, partial, term);
}

// sums: [C, 2] = (sum g, sum g * xhat) per channel (ignored when training == 0).
template <typename T>
__device__ void bn_backward_apply_NCHW(const T* __restrict__ gy, const T* __restrict__ x,
                                       const T* __restrict__ mean, const T* __restrict__ invstd,
                                       const T* __restrict__ gamma, const T* __restrict__ beta,
                                       const T* __restrict__ sums, int N, int C, int HW, int relu,
                                       int input_is_xhat, int training, T* __restrict__ gx) {
    const T inv_m = (T)1 / (T)((long long)N * HW);
    for (long long plane = blockIdx.y; plane < (long long)N * C; plane += gridDim.y) {
        const int c = (int)(plane % C);
        const T m = mean[c];
        const T is = invstd[c];
        const T k = gamma[c] * is;
        const T offset = beta[c] - m * k;
        const T mean_g = training ? sums[2 * c] * inv_m : (T)0;
        const T mean_gx = training ? sums[2 * c + 1] * inv_m : (T)0;
        const T* __restrict__ gin = gy + plane * HW;
        const T* __restrict__ xin = x + plane * HW;
        T* __restrict__ out = gx + plane * HW;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < HW; q += blockDim.x * gridDim.x) {
            const T xv = xin[q];
            const T xhat = input_is_xhat ? xv : (xv - m) * is;
            T g = gin[q];
            if (relu && !(xv * k + offset > (T)0)) g = (T)0;
            out[q] = training ? k * (g - mean_g - xhat * mean_gx) : k * g;
        }
    }
}

// Plain per-channel partial sums (conv bias gradient): partial [C, S, 2], the second value 0.
template <typename T>
struct NfedPlainSum {
    const T* x;
    __device__ void operator()(long long idx, T& sum, T&) const { sum += x[idx]; }
};

template <typename T>
__device__ void channel_partial_sums_NCHW(const T* __restrict__ x, int N, int C, int HW, T* __restrict__ partial) {
    nfed_channel_partial_sums2(N, C, HW, partial, NfedPlainSum<T>{x});
}

#define NFED_BN_INSTANTIATE(T, SUFFIX)                                                                        \
    extern "C" __global__ void bn_partial_sums_NCHW_##SUFFIX(const T* x, int N, int C, int HW, T* partial) {    \
        bn_partial_sums_NCHW<T>(x, N, C, HW, partial);                                                        \
    }                                                                                                         \
    extern "C" __global__ void bn_finalize_stats_##SUFFIX(const T* partial, const T* x, int C, int S, int HW,   \
                                                          long long M, double momentum, double eps,           \
                                                          int update_running, T* running_mean,                \
                                                          T* running_var, T* mean_out, T* var_out,            \
                                                          T* invstd_out) {                                    \
        bn_finalize_stats<T>(partial, x, C, S, HW, M, momentum, eps, update_running, running_mean,            \
                             running_var, mean_out, var_out, invstd_out);                                     \
    }                                                                                                         \
    extern "C" __global__ void bn_forward_apply_NCHW_##SUFFIX(const T* x, const T* mean, const T* invstd,       \
                                                              const T* gamma, const T* beta, T* y,            \
                                                              T* xhat_out, int N, int C, int HW, int relu) {  \
        bn_forward_apply_NCHW<T>(x, mean, invstd, gamma, beta, y, xhat_out, N, C, HW, relu);                  \
    }                                                                                                         \
    extern "C" __global__ void bn_backward_partial_sums_NCHW_##SUFFIX(                                        \
        const T* gy, const T* x, const T* mean, const T* invstd, const T* gamma, const T* beta, int N, int C, \
        int HW, int relu, int input_is_xhat, T* partial) {                                                    \
        bn_backward_partial_sums_NCHW<T>(gy, x, mean, invstd, gamma, beta, N, C, HW, relu, input_is_xhat,     \
                                         partial);                                                            \
    }                                                                                                         \
    extern "C" __global__ void bn_backward_apply_NCHW_##SUFFIX(                                               \
        const T* gy, const T* x, const T* mean, const T* invstd, const T* gamma, const T* beta,               \
        const T* sums, int N, int C, int HW, int relu, int input_is_xhat, int training, T* gx) {              \
        bn_backward_apply_NCHW<T>(gy, x, mean, invstd, gamma, beta, sums, N, C, HW, relu, input_is_xhat,      \
                                  training, gx);                                                              \
    }                                                                                                         \
    extern "C" __global__ void channel_partial_sums_NCHW_##SUFFIX(const T* x, int N, int C, int HW,            \
                                                                  T* partial) {                               \
        channel_partial_sums_NCHW<T>(x, N, C, HW, partial);                                                   \
    }

NFED_BN_INSTANTIATE(float, f32)
NFED_BN_INSTANTIATE(double, f64)
