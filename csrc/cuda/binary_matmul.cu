// CUDA kernel of accel::binary_matmul: dot products of sign vectors packed 32 to a word, K - 2 popc(a XOR b), with
// the scale and bias epilogue fused. A plain launcher (no torch header), registered by binary_matmul_glue.cpp.
//
// The 64 x 64 tiles of word_tiles.cuh, each pair of words adding __popc(a XOR b) to its count.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/word_tiles.cuh"

namespace accel {
namespace {

struct PopcountXor {
  __device__ int operator()(uint32_t a, uint32_t b, int count) const { return count + __popc(a ^ b); }
};

__global__ void binary_matmul_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, int64_t M,
                                     int64_t N, int64_t W, int64_t k, const float* __restrict__ scale,
                                     bool scalar_scale, const float* __restrict__ bias, int32_t* __restrict__ out_int,
                                     float* __restrict__ out_float) {
  __shared__ WordTile<uint32_t> a_tile, b_tile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int count[kPerThread][kPerThread] = {};
  for (int64_t w0 = 0; w0 < W; w0 += kWords) {
    stage_word_tiles(a, b, M, N, W, m0, n0, w0, a_tile, b_tile);  // words past the edges are 0: they count nothing
    __syncthreads();
    combine_word_tiles(a_tile, b_tile, count, PopcountXor{});
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t m = m0 + ty + kThreads * i, n = n0 + tx + kThreads * j;
      if (m >= M || n >= N) continue;
      const int32_t dot = static_cast<int32_t>(k - 2 * static_cast<int64_t>(count[i][j]));
      if (out_int) {
        out_int[m * N + n] = dot;
      } else {
        float y = static_cast<float>(dot);
        if (scale) y *= scale[scalar_scale ? 0 : n];
        if (bias) y += bias[n];
        out_float[m * N + n] = y;
      }
    }
}

}  // namespace

// out_int (M, N) when scale and bias are null, else out_float; a (M, W) and b (N, W) row-major words on the device.
cudaError_t binary_matmul_cuda(const uint32_t* a, const uint32_t* b, int64_t M, int64_t N, int64_t W, int64_t k,
                               const float* scale, bool scalar_scale, const float* bias, int32_t* out_int,
                               float* out_float, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 block(kThreads, kThreads);
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>((M + kTile - 1) / kTile));
  binary_matmul_kernel<<<grid, block, 0, stream>>>(a, b, M, N, W, k, scale, scalar_scale, bias, out_int, out_float);
  return cudaGetLastError();
}

}  // namespace accel
