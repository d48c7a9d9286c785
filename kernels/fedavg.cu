// Weighted model averaging (FedAvg): out = sum_k weight[k] * src_k, all K sources read in ONE pass.
//
// The K source pointers and weights live in small device arrays, so averaging 25 models of one tensor
// is one launch that reads each source once and writes the result once: (K + 1) * n * sizeof(T) bytes,
// the minimum any implementation must move.  The float kernel uses 16-byte loads/stores when every
// pointer is 16-byte aligned (the caller checks) and finishes the n % 4 tail with scalar accesses.
// Accumulation is in float for float data (K is small and the weights sum to 1).
// weighted_accumulate is the streaming form for clients that arrive one by one: acc += weight * src;
// weighted_accumulate_f32_to_f64 does it into a float64 sum without a float64 copy of src.

template <typename T>
__device__ void weighted_sum(const unsigned long long* __restrict__ sources, const T* __restrict__ weights,
                             int K, T* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        T acc = (T)0;
        for (int k = 0; k < K; ++k) acc += weights[k] * reinterpret_cast<const T*>(sources[k])[i];
        out[i] = acc;
    }
}

extern "C" __global__ void weighted_sum_vec4_f32(const unsigned long long* __restrict__ sources,
                                                 const float* __restrict__ weights, int K,
                                                 float* __restrict__ out, long long n) {
    const long long n4 = n / 4;
    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = first; i < n4; i += stride) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int k = 0; k < K; ++k) {
            const float w = weights[k];
            const float4 s = reinterpret_cast<const float4*>(sources[k])[i];
            acc.x += w * s.x;
            acc.y += w * s.y;
            acc.z += w * s.z;
            acc.w += w * s.w;
        }
        reinterpret_cast<float4*>(out)[i] = acc;
    }
    for (long long i = n4 * 4 + first; i < n; i += stride) {
        float acc = 0.f;
        for (int k = 0; k < K; ++k) acc += weights[k] * reinterpret_cast<const float*>(sources[k])[i];
        out[i] = acc;
    }
}

template <typename T>
__device__ void weighted_accumulate(T* __restrict__ acc, const T* __restrict__ src, T weight, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        acc[i] += weight * src[i];
    }
}

extern "C" __global__ void weighted_sum_f32(const unsigned long long* sources, const float* weights, int K,
                                            float* out, long long n) {
    weighted_sum<float>(sources, weights, K, out, n);
}

extern "C" __global__ void weighted_sum_f64(const unsigned long long* sources, const double* weights, int K,
                                            double* out, long long n) {
    weighted_sum<double>(sources, weights, K, out, n);
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
