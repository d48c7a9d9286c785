// Fused optimiser updates: one pass over parameter, gradient and state (PyTorch semantics).
//
// Adam / AdamW (decoupled != 0):
//   AdamW: p *= 1 - lr * weight_decay            Adam: g += weight_decay * p   (L2 penalty)
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
//   p -= (lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
// The bias corrections 1 - beta^step come from the host (the step count lives on the host), so the
// update needs no device-to-host synchronisation.  Scalars arrive as double and are used in T.
// SGD: g += weight_decay * p; buf = momentum * buf + (1 - dampening) * g (buf = g on the first step);
//   nesterov: g += momentum * buf, else g = buf;  p -= lr * g.

template <typename T> __device__ __forceinline__ T nfed_sqrt(T v);
template <> __device__ __forceinline__ float nfed_sqrt<float>(float v) { return sqrtf(v); }
template <> __device__ __forceinline__ double nfed_sqrt<double>(double v) { return sqrt(v); }

template <typename T>
__device__ void adam_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            long long n, double lr, double beta1, double beta2, double eps,
                            double weight_decay, double bias_correction1, double bias_correction2,
                            int decoupled) {
    const T b1 = (T)beta1, b2 = (T)beta2;
    const T one_minus_b1 = (T)(1.0 - beta1), one_minus_b2 = (T)(1.0 - beta2);
    const T step_size = (T)(lr / bias_correction1);
    const T sqrt_bc2 = (T)sqrt(bias_correction2);
    const T e = (T)eps, wd = (T)weight_decay;
    const T decay = (T)(1.0 - lr * weight_decay);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        T param = p[i];
        T grad = g[i];
        if (decoupled) {
            param *= decay;
        } else if (weight_decay != 0.0) {
            grad += wd * param;
        }
        const T mi = b1 * m[i] + one_minus_b1 * grad;
        const T vi = b2 * v[i] + one_minus_b2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        p[i] = param - step_size * (mi / (nfed_sqrt(vi) / sqrt_bc2 + e));
    }
}

template <typename T>
__device__ void sgd_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n,
                           double lr, double momentum, double dampening, double weight_decay, int nesterov,
                           int first_step) {
    const T mu = (T)momentum, damp = (T)(1.0 - dampening), wd = (T)weight_decay, step = (T)lr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T param = p[i];
        T grad = g[i];
        if (weight_decay != 0.0) grad += wd * param;
        if (momentum != 0.0) {
            const T b = first_step ? grad : mu * buf[i] + damp * grad;
            buf[i] = b;
            grad = nesterov ? grad + mu * b : b;
        }
        p[i] = param - step * grad;
    }
}

#define NFED_OPTIM_INSTANTIATE(T, SUFFIX)                                                                    \
    extern "C" __global__ void adam_update_##SUFFIX(T* p, const T* g, T* m, T* v, long long n, double lr,    \
                                                    double beta1, double beta2, double eps,                  \
                                                    double weight_decay, double bias_correction1,            \
                                                    double bias_correction2, int decoupled) {                \
        adam_update<T>(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bias_correction1,                 \
                       bias_correction2, decoupled);                                                         \
    }                                                                                                        \
    extern "C" __global__ void sgd_update_##SUFFIX(T* p, const T* g, T* buf, long long n, double lr,         \
                                                   double momentum, double dampening, double weight_decay,   \
                                                   int nesterov, int first_step) {                           \
        sgd_update<T>(p, g, buf, n, lr, momentum, dampening, weight_decay, nesterov, first_step);            \
    }

NFED_OPTIM_INSTANTIATE(float, f32)
NFED_OPTIM_INSTANTIATE(double, f64)
