// Winograd F(2x2, 3x3) convolution (stride 1, any padding), NCHW: 2.25x fewer multiplications than a
// direct or im2col 3x3 convolution, and a transformed input 4x (not 9x) the size of the input.
//
//   U[xi, o, c] = (G g G^T)[xi]            filter transform, xi = 4 * r + s over the 4x4 tile
//   V[xi, c, t] = (B^T d B)[xi]            input transform of the 4x4 input patch d of output tile t
//   M[xi]       = U[xi] @ V[xi]            16 GEMMs [O, C] @ [C, T]: one strided-batched cuBLAS call
//   y tile      = A^T m A (+ bias)         output transform, 2x2 outputs per tile
// with  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//       A^T = [1 1 1 0; 0 1 -1 -1].
// Weight gradient, Winograd F(3x3, 2x2) with the same input transform (B^T above) and
//   G' = [1 0; .5 .5; .5 -.5; 0 -1],  A'^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1]:
//   Ug[xi, o, t] = (G' gy_t G'^T)[xi] for the 2x2 output-gradient tile t,
//   M[xi] = sum over tiles Ug[xi] @ V[xi]^T   (16 GEMMs [O, T] @ [T, C], accumulated over chunks),
//   dW[o, c] = A'^T M[:, o, c] A'           (3x3).
// Tiles of a chunk of NB samples are numbered t = (n * TH + ty) * TW + tx (TH x TW tiles per sample).
// Grids: y over the rows (o, c or (o, c) pairs), x over the tiles; every thread owns its outputs.

// Sample and tile row/column of chunk tile t.
__device__ __forceinline__ void nfed_tile_position(long long t, int TH, int TW, int& n, int& ty, int& tx) {
    n = (int)(t / ((long long)TH * TW));
    const int rest = (int)(t - (long long)n * TH * TW);
    ty = rest / TW;
    tx = rest - ty * TW;
}

template <typename T>
__device__ void winograd_filter_transform(const T* __restrict__ w, T* __restrict__ u, int O, int C) {
    for (long long oc = (long long)blockIdx.x * blockDim.x + threadIdx.x; oc < (long long)O * C;
         oc += (long long)blockDim.x * gridDim.x) {
        const T* g = w + oc * 9;
        T gg[4][3];  // G g
        for (int j = 0; j < 3; ++j) {
            gg[0][j] = g[j];
            gg[1][j] = (T)0.5 * (g[j] + g[3 + j] + g[6 + j]);
            gg[2][j] = (T)0.5 * (g[j] - g[3 + j] + g[6 + j]);
            gg[3][j] = g[6 + j];
        }
        const long long plane = (long long)O * C;
        for (int r = 0; r < 4; ++r) {  // (G g) G^T
            u[(4 * r + 0) * plane + oc] = gg[r][0];
            u[(4 * r + 1) * plane + oc] = (T)0.5 * (gg[r][0] + gg[r][1] + gg[r][2]);
            u[(4 * r + 2) * plane + oc] = (T)0.5 * (gg[r][0] - gg[r][1] + gg[r][2]);
            u[(4 * r + 3) * plane + oc] = gg[r][2];
        }
    }
}

template <typename T>
__device__ void winograd_input_transform_NCHW(const T* __restrict__ x, T* __restrict__ v, int NB, int C, int H,
                                              int W, int pad, int TH, int TW) {
    const long long tiles = (long long)NB * TH * TW;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tiles;
             t += (long long)blockDim.x * gridDim.x) {
            int n, ty, tx;
            nfed_tile_position(t, TH, TW, n, ty, tx);
            const T* __restrict__ plane = x + ((long long)n * C + c) * H * W;
            T d[4][4];
            for (int r = 0; r < 4; ++r) {
                const int hi = 2 * ty - pad + r;
                for (int s = 0; s < 4; ++s) {
                    const int wi = 2 * tx - pad + s;
                    d[r][s] = (hi >= 0 && hi < H && wi >= 0 && wi < W) ? plane[hi * W + wi] : (T)0;
                }
            }
            T bd[4][4];  // B^T d
            for (int s = 0; s < 4; ++s) {
                bd[0][s] = d[0][s] - d[2][s];
                bd[1][s] = d[1][s] + d[2][s];
                bd[2][s] = d[2][s] - d[1][s];
                bd[3][s] = d[1][s] - d[3][s];
            }
            const long long stride_xi = (long long)C * tiles;
            T* __restrict__ out = v + (long long)c * tiles + t;
            for (int r = 0; r < 4; ++r) {  // (B^T d) B
                out[(4 * r + 0) * stride_xi] = bd[r][0] - bd[r][2];
                out[(4 * r + 1) * stride_xi] = bd[r][1] + bd[r][2];
                out[(4 * r + 2) * stride_xi] = bd[r][2] - bd[r][1];
                out[(4 * r + 3) * stride_xi] = bd[r][1] - bd[r][3];
            }
        }
    }
}

template <typename T>
__device__ void winograd_output_transform_NCHW(const T* __restrict__ m, const T* __restrict__ bias,
                                               T* __restrict__ y, int NB, int O, int HO, int WO, int TH,
                                               int TW) {
    const long long tiles = (long long)NB * TH * TW;
    for (int o = blockIdx.y; o < O; o += gridDim.y) {
        const T b = bias != nullptr ? bias[o] : (T)0;
        for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tiles;
             t += (long long)blockDim.x * gridDim.x) {
            int n, ty, tx;
            nfed_tile_position(t, TH, TW, n, ty, tx);
            const long long stride_xi = (long long)O * tiles;
            const T* __restrict__ in = m + (long long)o * tiles + t;
            T am[2][4];  // A^T m
            for (int s = 0; s < 4; ++s) {
                const T m0 = in[(0 + s) * stride_xi], m1 = in[(4 + s) * stride_xi];
                const T m2 = in[(8 + s) * stride_xi], m3 = in[(12 + s) * stride_xi];
                am[0][s] = m0 + m1 + m2;
                am[1][s] = m1 - m2 - m3;
            }
            T* __restrict__ plane = y + ((long long)n * O + o) * HO * WO;
            for (int i = 0; i < 2; ++i) {  // (A^T m) A
                const int ho = 2 * ty + i;
                if (ho >= HO) continue;
                const T out0 = am[i][0] + am[i][1] + am[i][2];
                const T out1 = am[i][1] - am[i][2] - am[i][3];
                const int wo = 2 * tx;
                plane[ho * WO + wo] = out0 + b;
                if (wo + 1 < WO) plane[ho * WO + wo + 1] = out1 + b;
            }
        }
    }
}

template <typename T>
__device__ void winograd_grad_transform_NCHW(const T* __restrict__ gy, T* __restrict__ ug, int NB, int O, int HO,
                                             int WO, int TH, int TW) {
    const long long tiles = (long long)NB * TH * TW;
    for (int o = blockIdx.y; o < O; o += gridDim.y) {
        for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tiles;
             t += (long long)blockDim.x * gridDim.x) {
            int n, ty, tx;
            nfed_tile_position(t, TH, TW, n, ty, tx);
            const T* __restrict__ plane = gy + ((long long)n * O + o) * HO * WO;
            T g[2][2];
            for (int a = 0; a < 2; ++a) {
                for (int b = 0; b < 2; ++b) {
                    const int ho = 2 * ty + a, wo = 2 * tx + b;
                    g[a][b] = (ho < HO && wo < WO) ? plane[ho * WO + wo] : (T)0;
                }
            }
            T gg[4][2];  // G' g
            for (int b = 0; b < 2; ++b) {
                gg[0][b] = g[0][b];
                gg[1][b] = (T)0.5 * (g[0][b] + g[1][b]);
                gg[2][b] = (T)0.5 * (g[0][b] - g[1][b]);
                gg[3][b] = -g[1][b];
            }
            const long long stride_xi = (long long)O * tiles;
            T* __restrict__ out = ug + (long long)o * tiles + t;
            for (int r = 0; r < 4; ++r) {  // (G' g) G'^T
                out[(4 * r + 0) * stride_xi] = gg[r][0];
                out[(4 * r + 1) * stride_xi] = (T)0.5 * (gg[r][0] + gg[r][1]);
                out[(4 * r + 2) * stride_xi] = (T)0.5 * (gg[r][0] - gg[r][1]);
                out[(4 * r + 3) * stride_xi] = -gg[r][1];
            }
        }
    }
}

// M [16, O, C] -> dW [O, C, 3, 3].
template <typename T>
__device__ void winograd_weight_output_transform(const T* __restrict__ m, T* __restrict__ dw, int O, int C) {
    const long long plane = (long long)O * C;
    for (long long oc = (long long)blockIdx.x * blockDim.x + threadIdx.x; oc < plane;
         oc += (long long)blockDim.x * gridDim.x) {
        T am[3][4];  // A'^T m
        for (int s = 0; s < 4; ++s) {
            const T m0 = m[(0 + s) * plane + oc], m1 = m[(4 + s) * plane + oc];
            const T m2 = m[(8 + s) * plane + oc], m3 = m[(12 + s) * plane + oc];
            am[0][s] = m0 + m1 + m2;
            am[1][s] = m1 - m2;
            am[2][s] = m1 + m2 + m3;
        }
        T* __restrict__ out = dw + oc * 9;
        for (int i = 0; i < 3; ++i) {  // (A'^T m) A'
            out[3 * i + 0] = am[i][0] + am[i][1] + am[i][2];
            out[3 * i + 1] = am[i][1] - am[i][2];
            out[3 * i + 2] = am[i][1] + am[i][2] + am[i][3];
        }
    }
}

#define NFED_WINOGRAD_INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void winograd_filter_transform_##SUFFIX(const T* w, T* u, int O, int C) {           \
        winograd_filter_transform<T>(w, u, O, C);                                                             \
    }                                                                                                         \
    extern "C" __global__ void winograd_input_transform_NCHW_##SUFFIX(const T* x, T* v, int NB, int C, int H,  \
                                                                      int W, int pad, int TH, int TW) {       \
        winograd_input_transform_NCHW<T>(x, v, NB, C, H, W, pad, TH, TW);                                     \
    }                                                                                                         \
    extern "C" __global__ void winograd_output_transform_NCHW_##SUFFIX(const T* m, const T* bias, T* y,       \
                                                                       int NB, int O, int HO, int WO, int TH, \
                                                                       int TW) {                              \
        winograd_output_transform_NCHW<T>(m, bias, y, NB, O, HO, WO, TH, TW);                                 \
    }                                                                                                         \
    extern "C" __global__ void winograd_grad_transform_NCHW_##SUFFIX(const T* gy, T* ug, int NB, int O,       \
                                                                     int HO, int WO, int TH, int TW) {        \
        winograd_grad_transform_NCHW<T>(gy, ug, NB, O, HO, WO, TH, TW);                                       \
    }                                                                                                         \
    extern "C" __global__ void winograd_weight_output_transform_##SUFFIX(const T* m, T* dw, int O, int C) {   \
        winograd_weight_output_transform<T>(m, dw, O, C);                                                     \
    }

NFED_WINOGRAD_INSTANTIATE(float, f32)
NFED_WINOGRAD_INSTANTIATE(double, f64)
