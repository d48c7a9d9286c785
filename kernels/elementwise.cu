// Small NCHW elementwise kernels around the convolution GEMMs.
// Grids: y over the N*C planes, x over the H*W pixels of a plane (the channel is per plane, no division
// per element).

template <typename T>
__device__ void add_channel_bias_NCHW(T* __restrict__ y, const T* __restrict__ bias, long long planes, int C,
                                      int HW) {
    for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const T b = bias[plane % C];
        T* __restrict__ out = y + plane * HW;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < HW; q += blockDim.x * gridDim.x) out[q] += b;
    }
}

// y = max(x, 0); NaN propagates like torch.relu.
template <typename T>
__device__ void relu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T v = x[i];
        y[i] = v > (T)0 || v != v ? v : (T)0;
    }
}

// gx = gy * [y > 0], from the forward OUTPUT (so the input need not be kept).
template <typename T>
__device__ void relu_backward(const T* __restrict__ y, const T* __restrict__ gy, T* __restrict__ gx, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        gx[i] = y[i] > (T)0 ? gy[i] : (T)0;
    }
}

#define NFED_ELEMENTWISE_INSTANTIATE(T, SUFFIX)                                                             \
    extern "C" __global__ void add_channel_bias_NCHW_##SUFFIX(T* y, const T* bias, long long planes, int C, \
                                                              int HW) {                                     \
        add_channel_bias_NCHW<T>(y, bias, planes, C, HW);                                                   \
    }                                                                                                       \
    extern "C" __global__ void relu_forward_##SUFFIX(const T* x, T* y, long long n) {                       \
        relu_forward<T>(x, y, n);                                                                           \
    }                                                                                                       \
    extern "C" __global__ void relu_backward_##SUFFIX(const T* y, const T* gy, T* gx, long long n) {        \
        relu_backward<T>(y, gy, gx, n);                                                                     \
    }

NFED_ELEMENTWISE_INSTANTIATE(float, f32)
NFED_ELEMENTWISE_INSTANTIATE(double, f64)
