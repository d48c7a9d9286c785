// Direct convolution for layers with a short reduction (C * KH * KW small, e.g. the 3- and 2-channel
// first layers of the W-Net's two U-Nets): no patch matrix at all.
//
// For those layers im2col + GEMM writes and re-reads a C*KH*KW-row patch matrix that is larger than
// the input and nearly as large as the output, and the GEMM's inner dimension (18 or 27) is too short
// to feed the tensor cores; here each thread computes OB output channels of one output pixel, reading
// its C*KH*KW inputs once (neighbouring threads share them through the L1 cache) and the weights as
// warp-uniform loads, and writes its OB outputs with coalesced stores.
// Grid: x strides over the HO*WO output pixels, y over N * ceil(O / OB) (sample, channel block) pairs.
// Accumulation in the data type (fp32 FMA for float): exact fp32 whatever the precision mode.

#define NFED_DIRECT_OB 16

// One output pixel, OB channels starting at o0 (FULL: all OB exist, no per-channel guard).
template <typename T, bool FULL>
__device__ __forceinline__ void conv2d_direct_pixel(const T* __restrict__ xn, const T* __restrict__ w,
                                                    const T* __restrict__ bias, T* __restrict__ out,
                                                    int C, int H, int W, int KH, int KW, int stride, int pad,
                                                    int ho, int wo, int o0, int count, int P) {
    const int o_stride = C * KH * KW;  // small by construction (the dispatcher's limit)
    T acc[NFED_DIRECT_OB];
#pragma unroll
    for (int k = 0; k < NFED_DIRECT_OB; ++k) acc[k] = (T)0;
    const T* __restrict__ wo0 = w + o0 * o_stride;
    for (int c = 0; c < C; ++c) {
        for (int i = 0; i < KH; ++i) {
            const int hi = ho * stride - pad + i;
            if (hi < 0 || hi >= H) continue;
            for (int j = 0; j < KW; ++j) {
                const int wi = wo * stride - pad + j;
                if (wi < 0 || wi >= W) continue;
                const T v = xn[(c * H + hi) * W + wi];
                const int tap = (c * KH + i) * KW + j;
#pragma unroll
                for (int k = 0; k < NFED_DIRECT_OB; ++k) {
                    if (FULL || k < count) acc[k] += wo0[k * o_stride + tap] * v;
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < NFED_DIRECT_OB; ++k) {
        if (FULL || k < count) out[(long long)k * P] = acc[k] + (bias != nullptr ? bias[o0 + k] : (T)0);
    }
}

template <typename T>
__device__ void conv2d_direct_NCHW(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                   T* __restrict__ y, int N, int C, int H, int W, int O, int KH, int KW,
                                   int stride, int pad, int HO, int WO) {
    const int blocks_o = (O + NFED_DIRECT_OB - 1) / NFED_DIRECT_OB;
    const int P = HO * WO;
    for (long long row = blockIdx.y; row < (long long)N * blocks_o; row += gridDim.y) {
        const int n = (int)(row / blocks_o);
        const int o0 = (int)(row - (long long)n * blocks_o) * NFED_DIRECT_OB;
        const int count = O - o0 < NFED_DIRECT_OB ? O - o0 : NFED_DIRECT_OB;
        const T* __restrict__ xn = x + (long long)n * C * H * W;
        T* __restrict__ yn = y + ((long long)n * O + o0) * P;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += blockDim.x * gridDim.x) {
            const int ho = p / WO;
            const int wo = p - ho * WO;
            if (count == NFED_DIRECT_OB) {
                conv2d_direct_pixel<T, true>(xn, w, bias, yn + p, C, H, W, KH, KW, stride, pad, ho, wo, o0, count, P);
            } else {
                conv2d_direct_pixel<T, false>(xn, w, bias, yn + p, C, H, W, KH, KW, stride, pad, ho, wo, o0, count, P);
            }
        }
    }
}

extern "C" __global__ void conv2d_direct_NCHW_f32(const float* x, const float* w, const float* bias, float* y,
                                                  int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                                  int pad, int HO, int WO) {
    conv2d_direct_NCHW<float>(x, w, bias, y, N, C, H, W, O, KH, KW, stride, pad, HO, WO);
}

extern "C" __global__ void conv2d_direct_NCHW_f64(const double* x, const double* w, const double* bias, double* y,
                                                  int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                                  int pad, int HO, int WO) {
    conv2d_direct_NCHW<double>(x, w, bias, y, N, C, H, W, O, KH, KW, stride, pad, HO, WO);
}
