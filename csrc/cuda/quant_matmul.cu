// CUDA kernels of accel::int8_linear: y = (step_x,m step_w,n) sum_k qx_mk qw_nk + bias_n, the activations quantized
// per row inside the op as the CPU kernel quantizes them (csrc/cpu/quant_matmul.cpp), the products by __dp4a (four
// int8 x int8 products added into an int32 per instruction). Plain launchers (no torch header), registered by
// quant_matmul_glue.cpp.
//
// 1. quantize_rows_kernel, one block per row: step = max|x| / 127 (NaN when the row holds a NaN, so its output is
//    NaN), codes round(x / step) clamped to [-127, 127], zero-padded to Kp. The division and the rounding are the
//    IEEE ones (__fdiv_rn, __float2int_rn: half to even), whatever --use_fast_math makes of `/`, so the codes are
//    the CPU kernel's and the reference's.
// 2. int8_matmul_kernel: the 64 x 64 tiles of word_tiles.cuh, each pair of words (four codes each) adding their
//    __dp4a. A step of 16 words adds at most 64 * 127 * 127 < 2^20 to a sum, so steps accumulate in int32 and are
//    added into int64 totals: exact for any K, as the CPU kernel's.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/word_tiles.cuh"

namespace accel {
namespace {

constexpr int kRowThreads = 256;

struct Dp4a {
  __device__ int32_t operator()(int32_t a, int32_t b, int32_t sum) const { return __dp4a(a, b, sum); }
};

__global__ void quantize_rows_kernel(const float* __restrict__ x, int64_t K, int64_t Kp, int8_t* __restrict__ q,
                                     float* __restrict__ step) {
  __shared__ float top[kRowThreads];
  __shared__ int has_nan[kRowThreads];
  const int64_t m = blockIdx.x;
  const float* row = x + m * K;
  float local = 0.0f;
  int local_nan = 0;
  for (int64_t k = threadIdx.x; k < K; k += kRowThreads) {
    const float a = fabsf(row[k]);
    local = a > local ? a : local;
    local_nan |= a != a;
  }
  top[threadIdx.x] = local;
  has_nan[threadIdx.x] = local_nan;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      top[threadIdx.x] = fmaxf(top[threadIdx.x], top[threadIdx.x + half]);
      has_nan[threadIdx.x] |= has_nan[threadIdx.x + half];
    }
    __syncthreads();
  }
  const float s = has_nan[0] ? __int_as_float(0x7fc00000) : __fdiv_rn(top[0], 127.0f);
  if (threadIdx.x == 0) step[m] = s;
  int8_t* out = q + m * Kp;
  for (int64_t k = threadIdx.x; k < Kp; k += kRowThreads) {
    int code = 0;  // padding, all-zero rows and NaN rows (s not > 0) keep code 0
    if (k < K && s > 0.0f) code = min(127, max(-127, __float2int_rn(__fdiv_rn(row[k], s))));
    out[k] = static_cast<int8_t>(code);
  }
}

__global__ void int8_matmul_kernel(const int32_t* __restrict__ qx, const int32_t* __restrict__ qw, int64_t M,
                                   int64_t N, int64_t W, const float* __restrict__ step_x,
                                   const float* __restrict__ step_w, const float* __restrict__ bias,
                                   float* __restrict__ out) {
  __shared__ WordTile<int32_t> a_tile, b_tile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int64_t total[kPerThread][kPerThread] = {};
  for (int64_t w0 = 0; w0 < W; w0 += kWords) {
    stage_word_tiles(qx, qw, M, N, W, m0, n0, w0, a_tile, b_tile);  // words past the edges are 0: they add nothing
    __syncthreads();
    int32_t sum[kPerThread][kPerThread] = {};
    combine_word_tiles(a_tile, b_tile, sum, Dp4a{});
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) total[i][j] += sum[i][j];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t m = m0 + ty + kThreads * i, n = n0 + tx + kThreads * j;
      if (m >= M || n >= N) continue;
      // the CPU epilogue's operations in its order, unfused
      float y = __fmul_rn(__fmul_rn(static_cast<float>(total[i][j]), step_x[m]), step_w[n]);
      if (bias) y = __fadd_rn(y, bias[n]);
      out[m * N + n] = y;
    }
}

}  // namespace

// x (M, K) float32, qw (N, Kp) int8 codes (Kp a multiple of 4, >= K), step_w (N,), bias (N,) or null, all on the
// device; qx (M, Kp) and step_x (M,) are scratch; out (M, N).
cudaError_t int8_linear_cuda(const float* x, const int8_t* qw, const float* step_w, const float* bias, int64_t M,
                             int64_t K, int64_t Kp, int64_t N, int8_t* qx, float* step_x, float* out,
                             cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  quantize_rows_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream>>>(x, K, Kp, qx, step_x);
  const dim3 block(kThreads, kThreads);
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>((M + kTile - 1) / kTile));
  int8_matmul_kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const int32_t*>(qx),
                                                 reinterpret_cast<const int32_t*>(qw), M, N, Kp / 4, step_x, step_w,
                                                 bias, out);
  return cudaGetLastError();
}

}  // namespace accel
