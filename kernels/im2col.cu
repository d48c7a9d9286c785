// GEMM operand preparation for convolutions (NCHW): im2col, col2im and float -> bfloat16 packing.
//
// Layouts (row-major, one batch chunk of NB samples):
//   x   [NB, C, H, W]
//   col [NB, C*KH*KW, HO*WO]   row k = (c*KH + i)*KW + j, column p = ho*WO + wo
// so conv2d forward is one strided-batched GEMM  y[n] = W[O, C*KH*KW] @ col[n]  and backward-data is
// gcol[n] = W^T @ gy[n] followed by col2im.  col2im gathers (no atomics): each input pixel sums the
// col entries that read it, which also makes conv_transpose2d forward deterministic.
// bf16 values are carried as their 16 raw bits (unsigned short) so no host header is needed (NVRTC).

__device__ __forceinline__ unsigned short nfed_float_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {          // NaN: keep it a (quiet) NaN
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);                 // round to nearest, ties to even
    return (unsigned short)(u >> 16);
}

template <typename Tin>
__device__ __forceinline__ Tin nfed_convert(Tin v, Tin*) { return v; }
__device__ __forceinline__ unsigned short nfed_convert(float v, unsigned short*) {
    return nfed_float_to_bf16_bits(v);
}

// Grid: x strides over the HO*WO columns, y over the NB*C*KH*KW rows (both grid-stride loops).
template <typename Tin, typename Tout>
__device__ void im2col_NCHW(const Tin* __restrict__ x, Tout* __restrict__ col,
                            int NB, int C, int H, int W, int KH, int KW,
                            int stride, int pad, int HO, int WO) {
    const int K = C * KH * KW;
    const int P = HO * WO;
    const long long rows = (long long)NB * K;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const int n = (int)(row / K);
        const int k = (int)(row - (long long)n * K);
        const int c = k / (KH * KW);
        const int kk = k - c * KH * KW;
        const int i = kk / KW;
        const int j = kk - i * KW;
        const Tin* __restrict__ plane = x + ((long long)n * C + c) * H * W;
        Tout* __restrict__ out = col + row * P;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += blockDim.x * gridDim.x) {
            const int ho = p / WO;
            const int wo = p - ho * WO;
            const int hi = ho * stride - pad + i;
            const int wi = wo * stride - pad + j;
            Tin v = (Tin)0;
            if (hi >= 0 && hi < H && wi >= 0 && wi < W) v = plane[hi * W + wi];
            out[p] = nfed_convert(v, (Tout*)0);
        }
    }
}

// Grid: x strides over the H*W pixels, y over the NB*C planes.
template <typename T>
__device__ void col2im_NCHW(const T* __restrict__ col, T* __restrict__ x,
                            int NB, int C, int H, int W, int KH, int KW,
                            int stride, int pad, int HO, int WO) {
    const int K = C * KH * KW;
    const int P = HO * WO;
    const long long planes = (long long)NB * C;
    for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const int n = (int)(plane / C);
        const int c = (int)(plane - (long long)n * C);
        const T* __restrict__ base = col + ((long long)n * K + (long long)c * KH * KW) * P;
        T* __restrict__ out = x + plane * H * W;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < H * W; q += blockDim.x * gridDim.x) {
            const int h = q / W;
            const int w = q - h * W;
            T sum = (T)0;
            for (int i = 0; i < KH; ++i) {
                const int hn = h + pad - i;
                if (hn < 0 || hn % stride != 0) continue;
                const int ho = hn / stride;
                if (ho >= HO) continue;
                for (int j = 0; j < KW; ++j) {
                    const int wn = w + pad - j;
                    if (wn < 0 || wn % stride != 0) continue;
                    const int wo = wn / stride;
                    if (wo >= WO) continue;
                    sum += base[(long long)(i * KW + j) * P + ho * WO + wo];
                }
            }
            out[q] = sum;
        }
    }
}

extern "C" {

__global__ void im2col_NCHW_f32(const float* x, float* col, int NB, int C, int H, int W, int KH, int KW,
                                int stride, int pad, int HO, int WO) {
    im2col_NCHW<float, float>(x, col, NB, C, H, W, KH, KW, stride, pad, HO, WO);
}

__global__ void im2col_NCHW_f64(const double* x, double* col, int NB, int C, int H, int W, int KH, int KW,
                                int stride, int pad, int HO, int WO) {
    im2col_NCHW<double, double>(x, col, NB, C, H, W, KH, KW, stride, pad, HO, WO);
}

// float input, bf16 column matrix: the bf16 GEMM path packs while it gathers (one pass, half the bytes).
__global__ void im2col_NCHW_f32_to_bf16(const float* x, unsigned short* col, int NB, int C, int H, int W,
                                        int KH, int KW, int stride, int pad, int HO, int WO) {
    im2col_NCHW<float, unsigned short>(x, col, NB, C, H, W, KH, KW, stride, pad, HO, WO);
}

__global__ void col2im_NCHW_f32(const float* col, float* x, int NB, int C, int H, int W, int KH, int KW,
                                int stride, int pad, int HO, int WO) {
    col2im_NCHW<float>(col, x, NB, C, H, W, KH, KW, stride, pad, HO, WO);
}

__global__ void col2im_NCHW_f64(const double* col, double* x, int NB, int C, int H, int W, int KH, int KW,
                                int stride, int pad, int HO, int WO) {
    col2im_NCHW<double>(col, x, NB, C, H, W, KH, KW, stride, pad, HO, WO);
}

// Any contiguous float array -> bf16 bits (weights and incoming gradients of the bf16 GEMM path).
__global__ void float_to_bf16(const float* __restrict__ src, unsigned short* __restrict__ dst, long long n) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)blockDim.x * gridDim.x) {
        dst[idx] = nfed_float_to_bf16_bits(src[idx]);
    }
}

}  // extern "C"
