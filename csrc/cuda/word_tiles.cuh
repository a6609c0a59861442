// The tiling shared by the CUDA products over rows of packed 32-bit words (binary_matmul.cu: sign bits,
// quant_matmul.cu: four int8 codes), which differ only in what a pair of words adds to a result.
//
// A block of 16 x 16 threads computes a 64 x 64 tile of the output, 4 x 4 results per thread, the indices
// interleaved (thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j), so the shared-memory reads of a warp hit
// distinct banks or broadcast. Per step the block stages 64 rows x 16 words of both operands in shared memory (each
// word loaded once from global memory, coalesced along the row), then each thread combines 16 x 16 word pairs in
// registers.
#pragma once

#include <cstdint>

namespace accel {

constexpr int kTile = 64, kThreads = 16, kPerThread = kTile / kThreads, kWords = 16;

template <typename Word>
using WordTile = Word[kTile][kWords + 1];  // +1: rows start in different banks

// Words [w0, w0 + 16) of the block's 64 rows of a (M, W) and b (N, W) into the tiles; words past the edges are 0.
template <typename Word>
__device__ inline void stage_word_tiles(const Word* __restrict__ a, const Word* __restrict__ b, int64_t M, int64_t N,
                                        int64_t W, int64_t m0, int64_t n0, int64_t w0, WordTile<Word>& a_tile,
                                        WordTile<Word>& b_tile) {
  const int tid = threadIdx.y * kThreads + threadIdx.x;
  for (int e = tid; e < kTile * kWords; e += kThreads * kThreads) {  // 4 words per thread and operand
    const int r = e / kWords, c = e % kWords;
    const int64_t w = w0 + c;
    a_tile[r][c] = (m0 + r < M && w < W) ? a[(m0 + r) * W + w] : Word(0);
    b_tile[r][c] = (n0 + r < N && w < W) ? b[(n0 + r) * W + w] : Word(0);
  }
}

// acc[i][j] = combine(a word of row ty + 16 i, a word of column tx + 16 j, acc[i][j]) over the staged words.
template <typename Word, typename Acc, typename Combine>
__device__ inline void combine_word_tiles(const WordTile<Word>& a_tile, const WordTile<Word>& b_tile,
                                          Acc (&acc)[kPerThread][kPerThread], Combine combine) {
#pragma unroll
  for (int c = 0; c < kWords; ++c) {
    Word av[kPerThread], bv[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) av[i] = a_tile[threadIdx.y + kThreads * i][c];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) bv[j] = b_tile[threadIdx.x + kThreads * j][c];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] = combine(av[i], bv[j], acc[i][j]);
  }
}

}  // namespace accel
