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

#define NFED_ELEMENTWISE_INSTANTIATE(T, SUFFIX)                                                             \
    extern "C" __global__ void add_channel_bias_NCHW_##SUFFIX(T* y, const T* bias, long long planes, int C, \
                                                              int HW) {                                     \
        add_channel_bias_NCHW<T>(y, bias, planes, C, HW);                                                   \
    }

NFED_ELEMENTWISE_INSTANTIATE(float, f32)
NFED_ELEMENTWISE_INSTANTIATE(double, f64)
