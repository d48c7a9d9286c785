// FedAvg's running sum on the device: acc += weight * src in one pass, for clients that arrive one by one
// (nfed.federation.aggregator on CuPy weights). weighted_accumulate_f32_to_f64 adds float32 weights into a
// float64 sum without a float64 copy of src.

template <typename T>
__device__ void weighted_accumulate(T* __restrict__ acc, const T* __restrict__ src, T weight, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        acc[i] += weight * src[i];
    }
}

extern "C" __global__ void weighted_accumulate_f32(float* acc, const float* src, float weight, long long n) {
    weighted_accumulate<float>(acc, src, weight, n);
}

extern "C" __global__ void weighted_accumulate_f64(double* acc, const double* src, double weight, long long n) {
    weighted_accumulate<double>(acc, src, weight, n);
}

extern "C" __global__ void weighted_accumulate_f32_to_f64(double* __restrict__ acc, const float* __restrict__ src,
                                                          double weight, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        acc[i] += weight * (double)src[i];
    }
}
