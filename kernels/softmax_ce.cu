// Softmax over the class axis of NKHW logits (K = classes, HW = pixels per image; [N, K] is HW = 1) and
// the fused softmax cross-entropy with PyTorch semantics (class weights, ignore_index).
//
// One thread per pixel loops over the K classes (K is small: 2 or 5); consecutive threads read
// consecutive pixels of one class plane, so every access is coalesced.
// Cross-entropy forward writes per pixel loss = w[t] * (logsumexp(x) - x[t]) and its weight w[t]
// (0 for ignored pixels) so the caller reduces both on the device (mean = sum loss / sum weight) without
// a host round trip.  A target outside [0, K) that is not ignore_index gives a NaN loss (the GPU cannot
// raise, and a NaN is visible where a silent skip would not be).
// Backward: gx[n, k, q] = scale * w[t] * (softmax_k - [k == t]) with scale = grad / denominator read from
// device memory (one value, or one per pixel for reduction="none").

template <typename T> __device__ __forceinline__ T nfed_exp(T v);
template <> __device__ __forceinline__ float nfed_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double nfed_exp<double>(double v) { return exp(v); }
template <typename T> __device__ __forceinline__ T nfed_log(T v);
template <> __device__ __forceinline__ float nfed_log<float>(float v) { return logf(v); }
template <> __device__ __forceinline__ double nfed_log<double>(double v) { return log(v); }

template <typename T>
__device__ __forceinline__ T nfed_class_max(const T* __restrict__ base, int K, long long HW) {
    T m = base[0];
    for (int k = 1; k < K; ++k) {
        const T v = base[k * HW];
        if (v > m || v != v) m = v;
    }
    return m;
}

template <typename T>
__device__ void softmax_NKHW(const T* __restrict__ x, T* __restrict__ y, long long N, int K, long long HW,
                             int log_output) {
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < N * HW;
         pix += (long long)blockDim.x * gridDim.x) {
        const long long n = pix / HW;
        const long long q = pix - n * HW;
        const T* __restrict__ base = x + n * K * HW + q;
        T* __restrict__ out = y + n * K * HW + q;
        const T m = nfed_class_max(base, K, HW);
        T sum = 0;
        for (int k = 0; k < K; ++k) sum += nfed_exp(base[k * HW] - m);
        if (log_output) {
            const T lse = nfed_log(sum);
            for (int k = 0; k < K; ++k) out[k * HW] = base[k * HW] - m - lse;
        } else {
            const T inv = (T)1 / sum;
            for (int k = 0; k < K; ++k) out[k * HW] = nfed_exp(base[k * HW] - m) * inv;
        }
    }
}

// Backward of softmax (log_output = 0: gx = y * (gy - sum_k gy_k y_k)) and of log_softmax
// (log_output = 1, y = log-probabilities: gx = gy - exp(y) * sum_k gy_k).
template <typename T>
__device__ void softmax_backward_NKHW(const T* __restrict__ y, const T* __restrict__ gy, T* __restrict__ gx,
                                      long long N, int K, long long HW, int log_output) {
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < N * HW;
         pix += (long long)blockDim.x * gridDim.x) {
        const long long n = pix / HW;
        const long long q = pix - n * HW;
        const long long offset = n * K * HW + q;
        T dot = 0;
        for (int k = 0; k < K; ++k) {
            dot += log_output ? gy[offset + k * HW] : gy[offset + k * HW] * y[offset + k * HW];
        }
        for (int k = 0; k < K; ++k) {
            const long long i = offset + k * HW;
            gx[i] = log_output ? gy[i] - nfed_exp(y[i]) * dot : y[i] * (gy[i] - dot);
        }
    }
}

template <typename T>
__device__ void softmax_cross_entropy_forward_NKHW(const T* __restrict__ logits, const long long* __restrict__ target,
                                                   const T* __restrict__ class_weight, long long ignore_index,
                                                   long long N, int K, long long HW, T* __restrict__ loss,
                                                   T* __restrict__ pixel_weight) {
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < N * HW;
         pix += (long long)blockDim.x * gridDim.x) {
        const long long n = pix / HW;
        const long long q = pix - n * HW;
        const long long t = target[pix];
        if (t == ignore_index) {
            loss[pix] = (T)0;
            pixel_weight[pix] = (T)0;
            continue;
        }
        if (t < 0 || t >= K) {
            const T nan = (T)__int_as_float(0x7fc00000);
            loss[pix] = nan;
            pixel_weight[pix] = nan;
            continue;
        }
        const T* __restrict__ base = logits + n * K * HW + q;
        const T m = nfed_class_max(base, K, HW);
        T sum = 0;
        for (int k = 0; k < K; ++k) sum += nfed_exp(base[k * HW] - m);
        const T w = class_weight != nullptr ? class_weight[t] : (T)1;
        loss[pix] = w * (m + nfed_log(sum) - base[t * HW]);
        pixel_weight[pix] = w;
    }
}

template <typename T>
__device__ void softmax_cross_entropy_backward_NKHW(const T* __restrict__ logits, const long long* __restrict__ target,
                                                    const T* __restrict__ class_weight, long long ignore_index,
                                                    const T* __restrict__ scale, int scale_per_pixel,
                                                    long long N, int K, long long HW, T* __restrict__ gx) {
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < N * HW;
         pix += (long long)blockDim.x * gridDim.x) {
        const long long n = pix / HW;
        const long long q = pix - n * HW;
        const long long offset = n * K * HW + q;
        const long long t = target[pix];
        if (t == ignore_index || t < 0 || t >= K) {
            for (int k = 0; k < K; ++k) gx[offset + k * HW] = (T)0;
            continue;
        }
        const T* __restrict__ base = logits + offset;
        const T m = nfed_class_max(base, K, HW);
        T sum = 0;
        for (int k = 0; k < K; ++k) sum += nfed_exp(base[k * HW] - m);
        const T w = class_weight != nullptr ? class_weight[t] : (T)1;
        const T s = (scale_per_pixel ? scale[pix] : scale[0]) * w / sum;
        const T ws = (scale_per_pixel ? scale[pix] : scale[0]) * w;
        for (int k = 0; k < K; ++k) {
            T g = nfed_exp(base[k * HW] - m) * s;
            if (k == t) g -= ws;
            gx[offset + k * HW] = g;
        }
    }
}

#define NFED_SOFTMAX_INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void softmax_NKHW_##SUFFIX(const T* x, T* y, long long N, int K, long long HW,       \
                                                     int log_output) {                                        \
        softmax_NKHW<T>(x, y, N, K, HW, log_output);                                                          \
    }                                                                                                         \
    extern "C" __global__ void softmax_backward_NKHW_##SUFFIX(const T* y, const T* gy, T* gx, long long N,     \
                                                              int K, long long HW, int log_output) {          \
        softmax_backward_NKHW<T>(y, gy, gx, N, K, HW, log_output);                                            \
    }                                                                                                         \
    extern "C" __global__ void softmax_cross_entropy_forward_NKHW_##SUFFIX(                                   \
        const T* logits, const long long* target, const T* class_weight, long long ignore_index, long long N, \
        int K, long long HW, T* loss, T* pixel_weight) {                                                      \
        softmax_cross_entropy_forward_NKHW<T>(logits, target, class_weight, ignore_index, N, K, HW, loss,     \
                                              pixel_weight);                                                  \
    }                                                                                                         \
    extern "C" __global__ void softmax_cross_entropy_backward_NKHW_##SUFFIX(                                  \
        const T* logits, const long long* target, const T* class_weight, long long ignore_index,              \
        const T* scale, int scale_per_pixel, long long N, int K, long long HW, T* gx) {                       \
        softmax_cross_entropy_backward_NKHW<T>(logits, target, class_weight, ignore_index, scale,             \
                                               scale_per_pixel, N, K, HW, gx);                                \
    }

NFED_SOFTMAX_INSTANTIATE(float, f32)
NFED_SOFTMAX_INSTANTIATE(double, f64)
