// CUDA kernel of accel::rk_finalize (the forward): per sample, Hairer's error norm and the stiffness estimate, as
// csrc/cpu/rk_finalize.cpp computes them. A plain launcher (no torch header), registered by rk_finalize_glue.cpp;
// the backward runs in Triton (kernels/rk_finalize.py).
//
// y0, y1, g_prev (B, D), k (s, B, D) contiguous, h (B,):
//   e = sum_i b_err[i] k[i] (zero weights skipped, added in order), r = h e / (atol + rtol max(|y0|, |y1|)),
//   norm = sqrt(S / D) with S = sum_d r^2,
//   rho = sqrt(N) / sqrt(G) with N = sum_d (k[s-1] - k[s-2])^2, G = sum_d (y1 - g_prev)^2 (0 where G = 0).
// Per-element values in T, the three sums in double (float32 inputs too), like the CPU kernel.
//
// One block per sample: its threads stride over the row (coalesced loads), each keeping three double partial
// sums, which the block then adds in shared memory (a tree over kMaxThreads slots). The error weights travel by
// value in the kernel's parameters (no host-to-device copy per call), at most kMaxWeights nonzero ones.
#include <cstdint>

#include <cuda_runtime.h>

namespace accel {

constexpr int kRkFinalizeMaxWeights = 64;

namespace {

constexpr int kMaxThreads = 256;

template <typename T>
struct Weights {
  T b[kRkFinalizeMaxWeights];
  int stage[kRkFinalizeMaxWeights];
  int m;
};

// max(a, b) for a, b >= 0 or NaN, returning a NaN when either is one (torch.maximum's rule).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a < b || b != b) ? b : a;
}

__device__ __forceinline__ float abs_value(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_value(double x) { return fabs(x); }

template <typename T>
__global__ void rk_finalize_kernel(const T* __restrict__ y0, const T* __restrict__ y1, const T* __restrict__ k,
                                   const T* __restrict__ g_prev, const T* __restrict__ h, int64_t s, int64_t B,
                                   int64_t D, const Weights<T> w, T rtol, T atol, T* __restrict__ norm,
                                   T* __restrict__ rho) {
  __shared__ double sums[3][kMaxThreads];
  const int64_t b = blockIdx.x;
  const int64_t stride = B * D, row = b * D;
  const T hb = h[b];
  const T* k_last = k + (s - 1) * stride + row;
  const T* k_before = k + (s - 2) * stride + row;
  double err2 = 0, dk2 = 0, dy2 = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const int64_t o = row + d;
    T e = T(0);
    for (int j = 0; j < w.m; ++j) {
      const T term = w.b[j] * k[w.stage[j] * stride + o];
      e = j == 0 ? term : e + term;
    }
    const T a = y1[o];
    const T sc = atol + rtol * nan_max(abs_value(y0[o]), abs_value(a));
    const T r = (hb * e) / sc;
    const T dk = k_last[d] - k_before[d];
    const T dy = a - g_prev[o];
    err2 += static_cast<double>(r * r);
    dk2 += static_cast<double>(dk * dk);
    dy2 += static_cast<double>(dy * dy);
  }
  const int t = threadIdx.x;
  sums[0][t] = err2;
  sums[1][t] = dk2;
  sums[2][t] = dy2;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {  // blockDim.x is a power of two
    if (t < half) {
      sums[0][t] += sums[0][t + half];
      sums[1][t] += sums[1][t + half];
      sums[2][t] += sums[2][t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    norm[b] = static_cast<T>(sqrt(sums[0][0] / static_cast<double>(D)));
    rho[b] = sums[2][0] != 0 ? static_cast<T>(sqrt(sums[1][0]) / sqrt(sums[2][0])) : T(0);
  }
}

template <typename T>
cudaError_t launch(const T* y0, const T* y1, const T* k, const T* g_prev, const T* h, int64_t s, int64_t B,
                   int64_t D, const double* b_err, double rtol, double atol, T* norm, T* rho, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (s < 2 || B > 0x7fffffff) return cudaErrorInvalidValue;
  Weights<T> w{};
  w.m = 0;
  for (int64_t i = 0; i < s; ++i) {
    if (b_err[i] == 0.0) continue;
    if (w.m == kRkFinalizeMaxWeights) return cudaErrorInvalidValue;
    w.b[w.m] = static_cast<T>(b_err[i]);
    w.stage[w.m] = static_cast<int>(i);
    ++w.m;
  }
  int threads = 32;  // a power of two from one warp up to kMaxThreads, about D
  while (threads < kMaxThreads && threads < D) threads *= 2;
  rk_finalize_kernel<T><<<static_cast<unsigned>(B), threads, 0, stream>>>(
      y0, y1, k, g_prev, h, s, B, D, w, static_cast<T>(rtol), static_cast<T>(atol), norm, rho);
  return cudaGetLastError();
}

}  // namespace

// norm (B,) and rho (B,) for contiguous device tensors; b_err is a host array of s weights, at most
// kRkFinalizeMaxWeights of them nonzero (else cudaErrorInvalidValue, and nothing is launched).
cudaError_t rk_finalize_cuda(const float* y0, const float* y1, const float* k, const float* g_prev, const float* h,
                             int64_t s, int64_t B, int64_t D, const double* b_err, double rtol, double atol,
                             float* norm, float* rho, cudaStream_t stream) {
  return launch<float>(y0, y1, k, g_prev, h, s, B, D, b_err, rtol, atol, norm, rho, stream);
}

cudaError_t rk_finalize_cuda(const double* y0, const double* y1, const double* k, const double* g_prev,
                             const double* h, int64_t s, int64_t B, int64_t D, const double* b_err, double rtol,
                             double atol, double* norm, double* rho, cudaStream_t stream) {
  return launch<double>(y0, y1, k, g_prev, h, s, B, D, b_err, rtol, atol, norm, rho, stream);
}

}  // namespace accel
