// FedAvg's running sum on the device: acc += weight * src in one pass, for clients that arrive one by one
// (nfed.federation.aggregator on CuPy weights). The sum is float64; float32 weights are added without a
// float64 copy of src (weighted_accumulate_f32_to_f64).

template <typename S>
__device__ void weighted_accumulate(double* __restrict__ acc, const S* __restrict__ src, double weight,
                                    long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        acc[i] += weight * (double)src[i];
    }
}

extern "C" __global__ void weighted_accumulate_f64(double* acc, const double* src, double weight, long long n) {
    weighted_accumulate<double>(acc, src, weight, n);
}

extern "C" __global__ void weighted_accumulate_f32_to_f64(double* acc, const float* src, double weight, long long n) {
    weighted_accumulate<float>(acc, src, weight, n);
}
