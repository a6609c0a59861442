// CUDA kernel of accel::binary_matmul: dot products of sign vectors packed 32 to a word, K - 2 popc(a XOR b), with
// the scale and bias epilogue fused. A plain launcher (no torch header), registered by binary_matmul_glue.cpp.
//
// A block of 16 x 16 threads computes a 64 x 64 tile of the output, 4 x 4 results per thread, the indices
// interleaved (thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j), so the shared-memory reads of a warp hit
// distinct banks or broadcast. Per step the block stages 64 rows x 16 words of a and of b in shared memory (each word
// loaded once from global memory, coalesced along the row), then each thread runs 16 x 16 XOR + __popc on registers.
#include <cstdint>

#include <cuda_runtime.h>

namespace accel {
namespace {

constexpr int kTile = 64, kThreads = 16, kPerThread = kTile / kThreads, kWords = 16;

__global__ void binary_matmul_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, int64_t M,
                                     int64_t N, int64_t W, int64_t k, const float* __restrict__ scale,
                                     bool scalar_scale, const float* __restrict__ bias, int32_t* __restrict__ out_int,
                                     float* __restrict__ out_float) {
  __shared__ uint32_t a_tile[kTile][kWords + 1];  // +1: rows start in different banks
  __shared__ uint32_t b_tile[kTile][kWords + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreads + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int count[kPerThread][kPerThread] = {};
  for (int64_t w0 = 0; w0 < W; w0 += kWords) {
    // 64 x 16 words per operand, 256 threads: 4 words each; words past the edges are 0 and count nothing
    for (int e = tid; e < kTile * kWords; e += kThreads * kThreads) {
      const int r = e / kWords, c = e % kWords;
      const int64_t w = w0 + c;
      a_tile[r][c] = (m0 + r < M && w < W) ? a[(m0 + r) * W + w] : 0u;
      b_tile[r][c] = (n0 + r < N && w < W) ? b[(n0 + r) * W + w] : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kWords; ++c) {
      uint32_t av[kPerThread], bv[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) av[i] = a_tile[ty + kThreads * i][c];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) bv[j] = b_tile[tx + kThreads * j][c];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) count[i][j] += __popc(av[i] ^ bv[j]);
    }
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
