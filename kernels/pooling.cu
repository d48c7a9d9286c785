// Max pooling over NCHW without padding (window KxK, stride S, floor output size like PyTorch).
//
// Forward writes the pooled values and, per output, the window position i * K + j of the winning input
// (first maximum in row-major window order, NaN wins like in PyTorch): the index format of nfed's CPU
// max_pool2d, uint8 when K * K <= 256 (an eighth of PyTorch's int64 indices) else int32.  Only the
// indices are kept for backward, not the input.
// Backward:
//   * windows that do not overlap (K <= S): every input pixel lies in at most one window, so a gather
//     kernel writes every gx element exactly once (zero where it did not win): no atomics, no memset;
//   * overlapping windows (K > S): gx is zeroed by the caller and gy is scattered with atomicAdd.
// Grids: y over the N*C planes, x over the pixels of one plane (output plane forward, input plane backward).

template <typename T, typename I>
__device__ void max_pool2d_forward_NCHW(const T* __restrict__ x, T* __restrict__ y, I* __restrict__ argmax,
                                        long long planes, int H, int W, int K, int S, int HO, int WO) {
    for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const T* __restrict__ xin = x + plane * H * W;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < HO * WO; p += blockDim.x * gridDim.x) {
            const int ho = p / WO;
            const int wo = p - ho * WO;
            const int h0 = ho * S;
            const int w0 = wo * S;
            int best_index = 0;
            T best = xin[h0 * W + w0];
            for (int i = 0; i < K; ++i) {
                for (int j = 0; j < K; ++j) {
                    const T v = xin[(h0 + i) * W + (w0 + j)];
                    if (v > best || (v != v && best == best)) {
                        best = v;
                        best_index = i * K + j;
                    }
                }
            }
            y[plane * HO * WO + p] = best;
            argmax[plane * HO * WO + p] = (I)best_index;
        }
    }
}

template <typename T, typename I>
__device__ void max_pool2d_backward_gather_NCHW(const T* __restrict__ gy, const I* __restrict__ argmax,
                                                T* __restrict__ gx, long long planes, int H, int W, int K,
                                                int S, int HO, int WO) {
    for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const T* __restrict__ gin = gy + plane * HO * WO;
        const I* __restrict__ win = argmax + plane * HO * WO;
        T* __restrict__ out = gx + plane * H * W;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < H * W; q += blockDim.x * gridDim.x) {
            const int h = q / W;
            const int w = q - h * W;
            const int ho = h / S;
            const int wo = w / S;
            T g = (T)0;
            const int i = h - ho * S;
            const int j = w - wo * S;
            if (ho < HO && wo < WO && i < K && j < K) {
                const int p = ho * WO + wo;
                if ((int)win[p] == i * K + j) g = gin[p];
            }
            out[q] = g;
        }
    }
}

template <typename T, typename I>
__device__ void max_pool2d_backward_scatter_NCHW(const T* __restrict__ gy, const I* __restrict__ argmax,
                                                 T* __restrict__ gx, long long planes, int H, int W, int K,
                                                 int S, int HO, int WO) {
    for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < HO * WO; p += blockDim.x * gridDim.x) {
            const int index = (int)argmax[plane * HO * WO + p];
            const int ho = p / WO;
            const int wo = p - ho * WO;
            const int h = ho * S + index / K;
            const int w = wo * S + index % K;
            atomicAdd(gx + plane * H * W + h * W + w, gy[plane * HO * WO + p]);
        }
    }
}

#define NFED_POOL_INSTANTIATE(T, I, SUFFIX)                                                                  \
    extern "C" __global__ void max_pool2d_forward_NCHW_##SUFFIX(const T* x, T* y, I* argmax,                 \
                                                                long long planes, int H, int W, int K,       \
                                                                int S, int HO, int WO) {                     \
        max_pool2d_forward_NCHW<T, I>(x, y, argmax, planes, H, W, K, S, HO, WO);                             \
    }                                                                                                        \
    extern "C" __global__ void max_pool2d_backward_gather_NCHW_##SUFFIX(const T* gy, const I* argmax,        \
                                                                        T* gx, long long planes, int H,      \
                                                                        int W, int K, int S, int HO,         \
                                                                        int WO) {                            \
        max_pool2d_backward_gather_NCHW<T, I>(gy, argmax, gx, planes, H, W, K, S, HO, WO);                   \
    }                                                                                                        \
    extern "C" __global__ void max_pool2d_backward_scatter_NCHW_##SUFFIX(const T* gy, const I* argmax,       \
                                                                         T* gx, long long planes, int H,     \
                                                                         int W, int K, int S, int HO,        \
                                                                         int WO) {                           \
        max_pool2d_backward_scatter_NCHW<T, I>(gy, argmax, gx, planes, H, W, K, S, HO, WO);                  \
    }

NFED_POOL_INSTANTIATE(float, unsigned char, f32_u8)
NFED_POOL_INSTANTIATE(double, unsigned char, f64_u8)
NFED_POOL_INSTANTIATE(float, int, f32_i32)
NFED_POOL_INSTANTIATE(double, int, f64_i32)
