// Quantized matmul on the CPU (accel/ops/quant_matmul.py), for AVX2, with an AVX-512 VNNI path for the int8 product
// and a portable twin.
//
// int8_linear: y = (step_x,m step_w,n) sum_k qx_mk qw_nk + bias_n. The activations are quantized inside the op, per
//   row, symmetric (codes in [-127, 127]); the weights come as int8 codes per output channel. The products use
//   vpmaddubsw, which multiplies unsigned by signed bytes and adds pairs into int16 with saturation: fed |qx| and
//   sign(qw, qx) (vpsignb), each pair is at most 2 * 127 * 127 = 32258, so it never saturates (u8 activations
//   with offset 128 would reach 2 * 255 * 127, which is why FBGEMM quantizes x86 activations to 7 bits).
//   vpmaddwd against ones widens to int32. Register tiles of 2 rows x 4 output channels, 32 codes per step; the
//   next tile's weights are prefetched (at M = 1 they stream from memory: 1.15 ms instead of 1.8 ms from a cold
//   cache at K = N = 4096, against FBGEMM's 1.5 ms).
// weight_only_linear (4 bits): y = sum_groups step_g sum_k x_k q_k + offset_g sum_k x_k. On AVX2 the codes are
//   multiplied as bytes against the activations split into three int8 digits (float32 accuracy; see the
//   comment above kDigitBlock), in tiles of 1 row x 2 channels or 2 rows x 1 channel; the portable path
//   converts the codes to floats. The codes are centred, q - 8 against offset_g + 8 step_g: with q in 0..15 the
//   two terms cancel, and y had twice the error of the reference's x . w_hat. The sums of x per group are
//   computed once per call. From 32 rows of x (compute-bound) blocks of weights are dequantized to floats and
//   multiplied by MKL instead: at M = 64 that runs at 0.9-1.3x float32 (the dequantization and MKL's packing of
//   each block are the difference), the byte kernel at 0.7-0.9x.
// Both run over blocks of output channels, in parallel; a block of weights is read once for all rows of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kChannelBlock = 32;  // output channels per task
constexpr int64_t kCodeBlock = 32;     // codes per step (one AVX2 vector of bytes)
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of the weights being read to prefetch
// Codes summed in the int32 lanes before they are added into int64 totals: each lane gains at most
// 2 * 2 * 127 * 127 per 32 codes, so a lane holds 2^15 codes' worth and their horizontal sum stays below 2^31.
// (A dot product over K codes reaches 127 * 127 * K, past int32 from K = 133,145.)
constexpr int64_t kLaneCodes = 32768;

// ---- int8 x int8 ----

struct Int8Operands {
  const int8_t* qx;      // (M, Kp) activation codes
  const float* step_x;   // (M,)
  const int8_t* qw;      // (N, Kp)
  const float* step_w;   // (N,)
  const float* bias;     // (N,) or null
  float* out;            // (M, N)
  int64_t Kp, N;
  const int64_t* w_shift = nullptr;  // (N,) 128 sum_k qw_nk, for the VNNI tiles (null: each tile sums its own)
};

template <int MR, int NR>
inline void int8_epilogue(const Int8Operands& g, int64_t m0, int64_t n0, const int64_t (&acc)[MR][NR]) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int64_t n = n0 + j;
      float y = static_cast<float>(acc[i][j]) * g.step_x[m0 + i] * g.step_w[n];
      if (g.bias) y += g.bias[n];
      g.out[(m0 + i) * g.N + n] = y;
    }
}

template <int MR, int NR>
void int8_tile_portable(const Int8Operands& g, int64_t m0, int64_t n0) {
  int64_t acc[MR][NR] = {};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int8_t* a = g.qx + (m0 + i) * g.Kp;
      const int8_t* w = g.qw + (n0 + j) * g.Kp;
      int64_t s = 0;
      for (int64_t k = 0; k < g.Kp; ++k) s += static_cast<int64_t>(a[k]) * static_cast<int64_t>(w[k]);
      acc[i][j] = s;
    }
  int8_epilogue<MR, NR>(g, m0, n0, acc);
}

#if defined(ACCEL_X86_AVX2)
ACCEL_AVX2 inline int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR>
ACCEL_AVX2 void int8_tile_avx2(const Int8Operands& g, int64_t m0, int64_t n0) {
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t acc[MR][NR] = {};
  for (int64_t k0 = 0; k0 < g.Kp; k0 += kLaneCodes) {
    const int64_t k1 = std::min(g.Kp, k0 + kLaneCodes);
    __m256i sum[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) sum[i][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += kCodeBlock) {
      __m256i a[MR], mag[MR];
      for (int i = 0; i < MR; ++i) {
        a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.qx + (m0 + i) * g.Kp + k));
        mag[i] = _mm256_abs_epi8(a[i]);  // from the codes: a second array of |qx| cost 30% at M = 64 in loads
      }
      for (int j = 0; j < NR; ++j) {
        const int8_t* w_at = g.qw + (n0 + j) * g.Kp + k;
        // the same codes of the next tile's channels: they are read next, from memory, at M = 1
        _mm_prefetch(reinterpret_cast<const char*>(w_at + NR * g.Kp), _MM_HINT_T0);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_at));
        for (int i = 0; i < MR; ++i) {
          const __m256i pairs = _mm256_maddubs_epi16(mag[i], _mm256_sign_epi8(w, a[i]));
          sum[i][j] = _mm256_add_epi32(sum[i][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += horizontal_sum_epi32(sum[i][j]);
  }
  int8_epilogue<MR, NR>(g, m0, n0, acc);
}

// With VNNI: vpdpbusd multiplies unsigned by signed bytes and adds each four products into an int32 lane, without
// saturation. The activation codes go in shifted to unsigned, qx + 128 (qx XOR 0x80 as bytes), and the 128 sum_k w
// this adds is taken off again: the same instruction of 0x80 bytes against the weights. 64 codes per step; a
// lane gains at most 4 * 255 * 127 per step, so kLaneCodes still bounds the int32 sums.
// The mask of a step of 64 codes at k: Kp is a multiple of 32, so the last step may hold 32 codes, the rest of the
// vector masked to zero (zero codes add nothing).
inline __mmask64 vnni_step_mask(int64_t k, int64_t k1) {
  return k + 2 * kCodeBlock <= k1 ? ~__mmask64{0} : (__mmask64{1} << kCodeBlock) - 1;
}

template <int MR, int NR>
ACCEL_AVX512_VNNI void int8_tile_vnni(const Int8Operands& g, int64_t m0, int64_t n0) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const bool own_shift = g.w_shift == nullptr;
  int64_t acc[MR][NR] = {};
  for (int64_t k0 = 0; k0 < g.Kp; k0 += kLaneCodes) {
    const int64_t k1 = std::min(g.Kp, k0 + kLaneCodes);
    __m512i sum[MR][NR], shift[NR];
    for (int j = 0; j < NR; ++j) {
      shift[j] = _mm512_setzero_si512();
      for (int i = 0; i < MR; ++i) sum[i][j] = _mm512_setzero_si512();
    }
    for (int64_t k = k0; k < k1; k += 2 * kCodeBlock) {
      const __mmask64 mask = vnni_step_mask(k, k1);
      __m512i a[MR];
      for (int i = 0; i < MR; ++i)
        a[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, g.qx + (m0 + i) * g.Kp + k), flip);
      for (int j = 0; j < NR; ++j) {
        const int8_t* w_at = g.qw + (n0 + j) * g.Kp + k;
        _mm_prefetch(reinterpret_cast<const char*>(w_at + NR * g.Kp), _MM_HINT_T0);
        const __m512i w = _mm512_maskz_loadu_epi8(mask, w_at);
        if (own_shift) shift[j] = _mm512_dpbusd_epi32(shift[j], flip, w);
        for (int i = 0; i < MR; ++i) sum[i][j] = _mm512_dpbusd_epi32(sum[i][j], a[i], w);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const int64_t shifted = own_shift ? _mm512_reduce_add_epi32(shift[j]) : 0;
      for (int i = 0; i < MR; ++i) acc[i][j] += _mm512_reduce_add_epi32(sum[i][j]) - shifted;
    }
  }
  if (!own_shift)
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < MR; ++i) acc[i][j] -= g.w_shift[n0 + j];
  int8_epilogue<MR, NR>(g, m0, n0, acc);
}

// 128 sum_k qw_nk for the channels [n0, n1): made once per block when several row tiles reuse it.
ACCEL_AVX512_VNNI void int8_weight_shifts_vnni(const Int8Operands& g, int64_t n0, int64_t n1, int64_t* shifts) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    int64_t total = 0;
    for (int64_t k0 = 0; k0 < g.Kp; k0 += kLaneCodes) {
      const int64_t k1 = std::min(g.Kp, k0 + kLaneCodes);
      __m512i shift = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 2 * kCodeBlock)
        shift = _mm512_dpbusd_epi32(shift, flip, _mm512_maskz_loadu_epi8(vnni_step_mask(k, k1), g.qw + n * g.Kp + k));
      total += _mm512_reduce_add_epi32(shift);
    }
    shifts[n] = total;
  }
}
#endif

template <int MR, int NR>
void int8_tile(const Int8Operands& g, int64_t m0, int64_t n0) {
#if defined(ACCEL_X86_AVX2)
  if (cpu_has_avx512_vnni()) return int8_tile_vnni<MR, NR>(g, m0, n0);
  if (cpu_has_avx2()) return int8_tile_avx2<MR, NR>(g, m0, n0);
#endif
  int8_tile_portable<MR, NR>(g, m0, n0);
}

template <int MR>
void int8_row(const Int8Operands& g, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) int8_tile<MR, 4>(g, m0, n);
  for (; n < n1; ++n) int8_tile<MR, 1>(g, m0, n);
}

// The largest |x| of a row; a NaN stays (a max alone would drop it), so its row's output is NaN.
float abs_max_portable(const float* row, int64_t n) {
  float top = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(row[k]);
    top = a > top ? a : top;
    nan |= a != a;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : top;
}

#if defined(ACCEL_X86_AVX2)
// The same in vectors (GCC does not vectorize the max reduction above without -ffast-math): vmaxps drops NaN as
// the reduction goes on, so a second vector flags the unordered lanes.
ACCEL_AVX2 float abs_max_avx2(const float* row, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k));
    top = _mm256_max_ps(top, a);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  const float tail = abs_max_portable(row + k, n - k);
  if (_mm256_movemask_ps(unordered) != 0 || tail != tail) return std::numeric_limits<float>::quiet_NaN();
  return std::max(tail, horizontal_max(top));
}
#endif

float abs_max(const float* row, int64_t n) {
#if defined(ACCEL_X86_AVX2)
  if (cpu_has_avx2()) return abs_max_avx2(row, n);
#endif
  return abs_max_portable(row, n);
}

// Codes of one row with step s > 0 (cloned for AVX2, where the loop vectorizes).
ACCEL_CPU_CLONES void quantize_row(const float* row, int64_t K, float s, int8_t* q) {
  for (int64_t k = 0; k < K; ++k)
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(row[k] / s))));
}

// Symmetric per-row int8 codes of x (M, K) float32, zero-padded to Kp: q = round(x / step), step = max|x| / 127,
// computed as torch computes round(x / step) in float32.
void quantize_rows(const at::Tensor& x, int64_t Kp, std::vector<int8_t>& q, std::vector<float>& step) {
  const int64_t M = x.size(0), K = x.size(1);
  const float* xd = x.data_ptr<float>();
  q.assign(M * Kp, 0);
  step.assign(M, 0.0f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xd + m * K;
      const float s = abs_max(row, K) / 127.0f;
      step[m] = s;
      if (s > 0.0f) quantize_row(row, K, s, q.data() + m * Kp);  // an all-zero row keeps codes 0
    }
  });
}

at::Tensor int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& qw_in, const at::Tensor& step_w_in,
                           const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int8_linear: x must be (M, K) float32");
  TORCH_CHECK(qw_in.dim() == 2 && qw_in.scalar_type() == at::kChar && qw_in.size(1) % kCodeBlock == 0 &&
                  qw_in.size(1) >= x_in.size(1),
              "int8_linear: weight codes must be (N, Kp) int8 with Kp >= K a multiple of 32");
  const auto x = x_in.contiguous(), qw = qw_in.contiguous(), step_w = step_w_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = qw.size(0), Kp = qw.size(1);
  std::vector<int8_t> qx;
  std::vector<float> step_x;
  quantize_rows(x, Kp, qx, step_x);
  auto out = at::empty({M, N}, x.options());
  const Int8Operands g{qx.data(), step_x.data(), qw.data_ptr<int8_t>(), step_w.data_ptr<float>(),
                       bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), Kp, N};
  // With VNNI and more than two rows, the weights' shifts are summed once per block (the tiles of every row
  // pair would each sum them again: a third of their instructions) and rows go four at a time.
  std::vector<int64_t> shifts;
  bool vnni_rows = false;
#if defined(ACCEL_X86_AVX2)
  vnni_rows = M > 2 && cpu_has_avx512_vnni();
#endif
  Int8Operands tiles = g;
  if (vnni_rows) {
    shifts.resize(N);
    tiles.w_shift = shifts.data();
  }
  at::parallel_for(0, (N + kChannelBlock - 1) / kChannelBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kChannelBlock, n1 = std::min(N, n0 + kChannelBlock);
      int64_t m = 0;
#if defined(ACCEL_X86_AVX2)
      if (vnni_rows) {
        int8_weight_shifts_vnni(g, n0, n1, shifts.data());
        for (; m + 4 <= M; m += 4) int8_row<4>(tiles, m, n0, n1);
      }
#endif
      for (; m + 2 <= M; m += 2) int8_row<2>(tiles, m, n0, n1);
      for (; m < M; ++m) int8_row<1>(tiles, m, n0, n1);
    }
  });
  return out;
}

// ---- 4-bit weights, float activations ----

struct Int4Operands {
  const float* x;        // (M, Kp), zero-padded
  const float* xsum;     // (M, groups): sum of x per group
  const uint8_t* w;      // (N, Kp / 2)
  const float* step;     // (N, groups)
  const float* offset;   // (N, groups); the centred codes q - 8 take offset + 8 step (centred_offset)
  const float* bias;
  float* out;
  int64_t Kp, G, N;
  // the AVX2 path's activations, from split_rows
  const int8_t* digits;   // (M, 3 Kp)
  const int16_t* centre;  // (M, blocks, 3, 16): the int16 sums' start values, h, m, l
  const double* unit;     // (M,)
};

inline float centred_offset(float offset, float step) { return offset + 8.0f * step; }  // 8 step is exact

inline int code_at(const uint8_t* row, int64_t k) {  // code k of a row: block k / 32, nibble by k % 32
  const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
  return (k % 32) < 16 ? (byte & 0x0f) : (byte >> 4);
}

void int4_row_portable(const Int4Operands& g, int64_t m, int64_t n) {
  const uint8_t* w = g.w + n * (g.Kp / 2);
  const int64_t groups = g.Kp / g.G;
  const float* x = g.x + m * g.Kp;
  float y = 0.0f;
  for (int64_t q = 0; q < groups; ++q) {
    float dot = 0.0f;
    for (int64_t k = q * g.G; k < (q + 1) * g.G; ++k) dot += x[k] * static_cast<float>(code_at(w, k) - 8);
    const float s = g.step[n * groups + q];
    y += s * dot + centred_offset(g.offset[n * groups + q], s) * g.xsum[m * groups + q];
  }
  g.out[m * g.N + n] = g.bias ? y + g.bias[n] : y;
}

// The sums of x (M, Kp) over each group of G (a multiple of 32), (M, Kp / G): accumulated in double, four
// independent partial sums (one chain waited on each add's latency), one rounding to float.
at::Tensor group_sums(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), Kp = x.size(1);
  auto sums = at::empty({M, Kp / G}, x.options());
  const float* xd = x.data_ptr<float>();
  float* out = sums.data_ptr<float>();
  for (int64_t g = 0; g < M * (Kp / G); ++g) {
    double partial[4] = {};
    for (int64_t k = 0; k < G; k += 4)
      for (int p = 0; p < 4; ++p) partial[p] += xd[g * G + k + p];
    out[g] = static_cast<float>((partial[0] + partial[1]) + (partial[2] + partial[3]));
  }
  return sums;
}

// Several rows of x make the product compute-bound, where the byte kernel's three digits per activation cost more
// than floats: then blocks of channels are dequantized to floats, q step + offset (the reference's w_hat), and
// multiplied by MKL, one block per task.
// From 32 rows: at K = N = 4096 the byte kernel took 8.6 ms at M = 24 and 11.3 ms at M = 32, the float path
// 10.5 and 10.6 ms (one run, alternating, two threads, MKL held to AVX2).
constexpr int64_t kPanelRows = 32;  // rows of x from which the float path is taken
constexpr int64_t kPanelChannels = 256;  // channels dequantized per block

ACCEL_CPU_CLONES void dequantize_rows(const uint8_t* w, const float* step, const float* offset, int64_t rows,
                                      int64_t Kp, int64_t G, float* panel) {
  const int64_t groups = Kp / G;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < groups; ++q) {
      const float s = step[r * groups + q], o = offset[r * groups + q];
      for (int64_t k0 = q * G; k0 < (q + 1) * G; k0 += 32) {  // a 32-code block: 16 bytes, low nibbles first
        const uint8_t* bytes = w + r * (Kp / 2) + k0 / 2;
        float* out = panel + r * Kp + k0;
        for (int j = 0; j < 16; ++j) {
          out[j] = s * static_cast<float>(bytes[j] & 0x0f) + o;
          out[16 + j] = s * static_cast<float>(bytes[j] >> 4) + o;
        }
      }
    }
}

#if defined(ACCEL_X86_AVX2)
// The same in vectors: GCC left the loop above scalar, a quarter of the time at M = 64.
ACCEL_AVX2 void dequantize_rows_avx2(const uint8_t* w, const float* step, const float* offset, int64_t rows,
                                     int64_t Kp, int64_t G, float* panel) {
  const int64_t groups = Kp / G;
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < groups; ++q) {
      const __m256 s = _mm256_set1_ps(step[r * groups + q]), o = _mm256_set1_ps(offset[r * groups + q]);
      for (int64_t k0 = q * G; k0 < (q + 1) * G; k0 += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * (Kp / 2) + k0 / 2));
        const __m128i halves[2] = {_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low)};
        float* out = panel + r * Kp + k0;
        for (int h = 0; h < 2; ++h)  // codes 0-15 of the block, then 16-31, 8 at a time
          for (int e = 0; e < 2; ++e) {
            const __m128i codes = e == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
            const __m256 q8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            _mm256_storeu_ps(out + 16 * h + 8 * e, _mm256_fmadd_ps(q8, s, o));
          }
      }
    }
}
#endif

// out = x w_hat^T (+ bias), a block of kPanelChannels channels per task.
void int4_linear_panels(const at::Tensor& x, const at::Tensor& w, const at::Tensor& step, const at::Tensor& offset,
                        int64_t group_size, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t N = w.size(0), Kp = x.size(1), groups = Kp / group_size;
  at::parallel_for(0, (N + kPanelChannels - 1) / kPanelChannels, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;
    auto panel = at::empty({kPanelChannels, Kp}, x.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kPanelChannels, nb = std::min(N - n0, kPanelChannels);
      auto dequantize = dequantize_rows;
#if defined(ACCEL_X86_AVX2)
      if (cpu_has_avx2()) dequantize = dequantize_rows_avx2;
#endif
      dequantize(w.data_ptr<uint8_t>() + n0 * (Kp / 2), step.data_ptr<float>() + n0 * groups,
                 offset.data_ptr<float>() + n0 * groups, nb, Kp, group_size, panel.data_ptr<float>());
      auto cols = out.narrow(1, n0, nb);
      const auto w_hat = panel.narrow(0, 0, nb).t();
      if (bias.defined()) at::addmm_out(cols, bias.narrow(0, n0, nb), x, w_hat);
      else at::mm_out(cols, x, w_hat);
    }
  });
}

// The AVX2 path multiplies the codes as bytes, with vpmaddubsw (unsigned codes 0..15 by signed bytes), 64 codes
// per instruction pair, where dequantizing them to floats took 20 instructions per 32 codes. To keep float32
// accuracy, each activation is split into three signed int8 digits: x = unit (254^2 h + 254 m + l), unit =
// max|x_row| / (127 254^2), |h|, |m|, |l| <= 127, each digit the rounded remainder of the one before, so the
// split is off by at most unit / 2 = 6.1e-8 max|x_row| (float32's own rounding is 6e-8 |x|).
// The codes come in 64-code chunks: a 32-byte load holds two 16-byte blocks, whose low nibbles (codes 0-15 and
// 32-47 of the chunk) and high nibbles (16-31, 48-63) are the two operands; the digits are stored permuted to
// match, h then m then l per chunk. A group of 32 (mod 64) codes ends in a 32-code chunk, in natural order.
// vpmaddubsw pairs reach 2 * 15 * 127 = 3810, so int16 lanes take 4 chunks (256 codes, a "block") before vpmaddwd
// widens them to int32. The sums are centred exactly, sum (q - 8) d = sum q d - 8 sum d: each int16 lane starts at
// -8 times the sum of the digits it will receive (`centre`, per row and block), so the block ends with no
// subtraction. Every partial sum is sum (q - 8) d over the bytes added so far plus -8 d over the rest, at most
// 16 * 8 * 127 in magnitude. Widened, the int32 lanes stay below 2^24, so their conversion to float is exact.
constexpr int64_t kDigitBlock = 256;
constexpr float kDigitBase = 254.0f;

inline int64_t blocks_per_group(int64_t G) { return (G + kDigitBlock - 1) / kDigitBlock; }

#if defined(ACCEL_X86_AVX2)
ACCEL_AVX2 inline __m256i load_bytes(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The digits of 16 consecutive activations src[0..16), scaled by `scale`, into h, m and l (16 bytes each): in
// double, four at a time (vroundpd rounds half to even, as std::nearbyint does).
ACCEL_AVX2 inline void split16(const float* src, __m256d scale, int8_t* h, int8_t* m, int8_t* l) {
  const __m256d base = _mm256_set1_pd(kDigitBase);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m128i hi[4], mid[4], lo[4];
  for (int v = 0; v < 4; ++v) {
    const __m256d x = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(src + 4 * v)), scale);
    const __m256d top = _mm256_round_pd(x, kNearest);
    const __m256d r = _mm256_mul_pd(_mm256_sub_pd(x, top), base);
    const __m256d middle = _mm256_round_pd(r, kNearest);
    hi[v] = _mm256_cvtpd_epi32(top);
    mid[v] = _mm256_cvtpd_epi32(middle);
    lo[v] = _mm256_cvtpd_epi32(_mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(r, middle), base), kNearest));
  }
  auto store = [](const __m128i (&q)[4], int8_t* out) {  // 16 int32 in [-127, 127] to bytes
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_packs_epi16(_mm_packs_epi32(q[0], q[1]), _mm_packs_epi32(q[2], q[3])));
  };
  store(hi, h);
  store(mid, m);
  store(lo, l);
}

// The digits of codes [k0, k0 + length) of a row (a chunk), into d (3 length bytes: h, m, l), in the order the
// kernel reads them (a 64-code chunk: vector bytes 0-31 the low nibbles, codes 0-15 and 32-47, then the high
// ones, 16-31 and 48-63; a 32-code chunk in natural order); -8 times the digits each of the kernel's int16 lanes
// receives goes into the chunk's block's start values c (3 x 16: h, m, l).
ACCEL_AVX2 void split_chunk(const float* row, double scale, int64_t k0, int64_t length, int8_t* d, int16_t* c) {
  static constexpr int kPermuted[4] = {0, 2, 1, 3};  // the 16-code run each 16 bytes of a 64-code chunk hold
  const __m256d s = _mm256_set1_pd(scale);
  for (int64_t run = 0; run < length / 16; ++run) {
    const int64_t from = 16 * (length == 64 ? kPermuted[run] : run);
    split16(row + k0 + from, s, d + 16 * run, d + length + 16 * run, d + 2 * length + 16 * run);
  }
  const __m256i eight = _mm256_set1_epi8(8);
  for (int digit = 0; digit < 3; ++digit) {
    __m256i start = load_bytes(c + 16 * digit);
    for (int64_t part = 0; part < length; part += 32)  // vpmaddubsw pairs bytes into the lanes, as the kernel does
      start = _mm256_sub_epi16(start, _mm256_maddubs_epi16(eight, load_bytes(d + digit * length + part)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 16 * digit), start);
  }
}

// x's rows as digits and centring lanes; rows that are all zero get unit 0, rows with NaN or Inf unit NaN (the
// caller computes those with the float path).
void split_rows(const at::Tensor& x, int64_t G, const at::Tensor& digits, std::vector<int16_t>& centre,
                std::vector<double>& unit) {
  const int64_t M = x.size(0), Kp = x.size(1), blocks = (Kp / G) * blocks_per_group(G);
  const float* xd = x.data_ptr<float>();
  digits.zero_();  // rows that are all zero, NaN or Inf keep zero digits
  centre.assign(M * blocks * 48, 0);
  unit.assign(M, 0.0);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xd + m * Kp;
      const float top = abs_max(row, Kp);
      if (!std::isfinite(top)) {
        unit[m] = std::nan("");
        continue;
      }
      if (top == 0.0f) continue;
      unit[m] = top / (127.0 * kDigitBase * kDigitBase);
      for (int64_t q0 = 0; q0 < Kp; q0 += G) {  // chunks of 64 codes from each group's start, then one of 32
        for (int64_t k0 = q0; k0 < q0 + G; k0 += 64) {
          const int64_t block = (k0 / G) * blocks_per_group(G) + (k0 % G) / kDigitBlock;
          const int64_t length = std::min<int64_t>(64, q0 + G - k0);
          split_chunk(row, 127.0 / top, k0, length, digits.data_ptr<int8_t>() + m * 3 * Kp + 3 * k0,
                      centre.data() + (m * blocks + block) * 48);
        }
      }
    }
  });
}

// An empty asm that takes the sums as register operands, so that each part's adds land in them: without it GCC
// reassociated the int16 adds (into a tree that spilled products to the stack where a block's chunks unrolled,
// into copies between registers each chunk where they did not); one thread at M=1 ran 3-6% slower.
template <int MR, int NR>
ACCEL_AVX2 inline void keep_in_registers(__m256i (&sums)[MR][NR][3]) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int digit = 0; digit < 3; ++digit) __asm__("" : "+x"(sums[i][j][digit]));
}

// Adds one 64-code chunk's products into the int16 sums of MR rows x NR channels: w[j] points at channel j's 32
// bytes of the chunk, d[i] at row i's digits of it (h, m, l; 64 bytes each). Part by part (low nibbles, then high
// ones), so that only NR code vectors are live: with all of them and the sums, 2 x 1 tiles spilled registers.
template <int MR, int NR>
ACCEL_AVX2 inline void add_chunk64(const uint8_t* const (&w)[NR], const int8_t* const (&d)[MR],
                                   __m256i (&sums)[MR][NR][3]) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int part = 0; part < 2; ++part) {
    __m256i codes[NR];
    for (int j = 0; j < NR; ++j) {
      const __m256i bytes = load_bytes(w[j]);  // the second part reads them again, from L1
      codes[j] = _mm256_and_si256(part == 0 ? bytes : _mm256_srli_epi16(bytes, 4), low);
    }
    for (int i = 0; i < MR; ++i)
      for (int digit = 0; digit < 3; ++digit) {
        const __m256i v = load_bytes(d[i] + digit * 64 + part * 32);
        for (int j = 0; j < NR; ++j)
          sums[i][j][digit] = _mm256_add_epi16(sums[i][j][digit], _mm256_maddubs_epi16(codes[j], v));
      }
    keep_in_registers(sums);
  }
}

// The same for a 32-code chunk (a group's last, when its size is 32 mod 64): 16 bytes per channel, low nibbles in
// the vector's lower half and high ones in the upper, 32 digit bytes each of h, m, l.
template <int MR, int NR>
ACCEL_AVX2 inline void add_chunk32(const uint8_t* const (&w)[NR], const int8_t* const (&d)[MR],
                                   __m256i (&sums)[MR][NR][3]) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i codes[NR];
  for (int j = 0; j < NR; ++j) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j]));
    codes[j] = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(bytes), _mm_srli_epi16(bytes, 4), 1),
                                low);
  }
  for (int i = 0; i < MR; ++i)
    for (int digit = 0; digit < 3; ++digit) {
      const __m256i v = load_bytes(d[i] + digit * 32);
      for (int j = 0; j < NR; ++j)
        sums[i][j][digit] = _mm256_add_epi16(sums[i][j][digit], _mm256_maddubs_epi16(codes[j], v));
    }
}

// The int16 sums of one block of a group (`length` codes), added to each row's start values, widened to int32,
// scaled by the group's steps into y.
template <int MR, int NR>
ACCEL_AVX2 inline void add_block(const float* const (&group_step)[NR], int64_t length,
                                 const uint8_t* (&w)[NR], const int8_t* (&d)[MR], const int16_t* (&centre)[MR],
                                 __m256 (&y)[MR][NR]) {
  for (int64_t line = 0; line < length / 2; line += 64)  // the block's lines of the next tile's weights
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w[j] + line) + kPrefetchBytes, _MM_HINT_T0);
  __m256i sums[MR][NR][3];
  for (int i = 0; i < MR; ++i)
    for (int digit = 0; digit < 3; ++digit) {
      const __m256i start = load_bytes(centre[i] + 16 * digit);
      for (int j = 0; j < NR; ++j) sums[i][j][digit] = start;
    }
  int64_t k = 0;
  for (; k + 64 <= length; k += 64) {
    add_chunk64<MR, NR>(w, d, sums);
    for (int j = 0; j < NR; ++j) w[j] += 32;
    for (int i = 0; i < MR; ++i) d[i] += 3 * 64;
  }
  if (k < length) {
    add_chunk32<MR, NR>(w, d, sums);
    for (int j = 0; j < NR; ++j) w[j] += 16;
    for (int i = 0; i < MR; ++i) d[i] += 3 * 32;
  }
  const __m256i ones = _mm256_set1_epi16(1), base = _mm256_set1_epi16(static_cast<int16_t>(kDigitBase));
  for (int i = 0; i < MR; ++i) {
    centre[i] += 48;
    for (int j = 0; j < NR; ++j) {
      const __m256i high = _mm256_madd_epi16(sums[i][j][0], ones);
      const __m256i rest =
          _mm256_add_epi32(_mm256_madd_epi16(sums[i][j][1], base), _mm256_madd_epi16(sums[i][j][2], ones));
      const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high), _mm256_set1_ps(kDigitBase * kDigitBase),
                                         _mm256_cvtepi32_ps(rest));
      y[i][j] = _mm256_fmadd_ps(sum, _mm256_broadcast_ss(group_step[j]), y[i][j]);
    }
  }
}

// MR rows of x (as digits) against NR output channels from n0, block by block (add_block); the offsets' part is a
// vector dot product of each channel's offsets and the rows' sums of x. Two channels per row of x at M = 1 give
// two independent streams of weights and load each digit once for both. The weights and digits are walked by
// pointers, read in order: index arithmetic on signed k (k / 2) took a sixth of the loop's instructions.
template <int MR, int NR>
ACCEL_AVX2 void int4_tile_avx2(const Int4Operands& g, int64_t m0, int64_t n0) {
  const int64_t groups = g.Kp / g.G, blocks = groups * blocks_per_group(g.G);
  const uint8_t* w[NR];
  const float* group_step[NR];  // the current group's step of each channel
  for (int j = 0; j < NR; ++j) {
    w[j] = g.w + (n0 + j) * (g.Kp / 2);
    group_step[j] = g.step + (n0 + j) * groups;
  }
  const int8_t* d[MR];
  const int16_t* centre[MR];
  for (int i = 0; i < MR; ++i) {
    d[i] = g.digits + (m0 + i) * 3 * g.Kp;
    centre[i] = g.centre + (m0 + i) * blocks * 48;
  }
  __m256 y[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i][j] = _mm256_setzero_ps();
  for (int64_t q = 0; q < groups; ++q) {
    for (int64_t b0 = 0; b0 < g.G; b0 += kDigitBlock)
      add_block<MR, NR>(group_step, std::min(kDigitBlock, g.G - b0), w, d, centre, y);
    for (int j = 0; j < NR; ++j) ++group_step[j];
  }
  const int64_t groups8 = groups - groups % 8;
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float* offset = g.offset + (n0 + j) * groups;
      const float* step = g.step + (n0 + j) * groups;
      const float* xsum = g.xsum + (m0 + i) * groups;
      __m256 part = _mm256_setzero_ps();
      for (int64_t q = 0; q < groups8; q += 8) {
        const __m256 centred = _mm256_fmadd_ps(_mm256_loadu_ps(step + q), eight, _mm256_loadu_ps(offset + q));
        part = _mm256_fmadd_ps(centred, _mm256_loadu_ps(xsum + q), part);
      }
      float total = static_cast<float>(horizontal_sum(y[i][j]) * g.unit[m0 + i]) + horizontal_sum(part);
      for (int64_t q = groups8; q < groups; ++q) total += centred_offset(offset[q], step[q]) * xsum[q];
      g.out[(m0 + i) * g.N + n0 + j] = g.bias ? total + g.bias[n0 + j] : total;
    }
}

template <int MR>
void int4_rows_avx2(const Int4Operands& g, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MR == 1 ? 2 : 1;  // 2 x 2 tiles (12 int16 sums) spill registers
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) int4_tile_avx2<MR, NR>(g, m0, n);
  for (; n < n1; ++n) int4_tile_avx2<MR, 1>(g, m0, n);
}
#endif

at::Tensor int4_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& step_in,
                           const at::Tensor& offset_in, int64_t group_size, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int4_linear: x must be (M, Kp) float32");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "int4_linear: group_size must be a multiple of 32");
  const int64_t M = x_in.size(0), Kp = x_in.size(1), N = w_in.size(0);
  TORCH_CHECK(Kp % group_size == 0 && w_in.dim() == 2 && w_in.scalar_type() == at::kByte && w_in.size(1) * 2 == Kp,
              "int4_linear: weights must be (N, Kp / 2) uint8 with Kp (x's width) a multiple of group_size");
  const int64_t groups = Kp / group_size;
  TORCH_CHECK(step_in.sizes() == at::IntArrayRef({N, groups}) && offset_in.sizes() == at::IntArrayRef({N, groups}),
              "int4_linear: step and offset must be (N, Kp / group_size)");
  const auto x = x_in.contiguous(), w = w_in.contiguous();
  const auto step = step_in.to(at::kFloat).contiguous();
  const auto offset = offset_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  auto out = at::empty({M, N}, x.options());
  if (M >= kPanelRows) {
    int4_linear_panels(x, w, step, offset, group_size, bias, out);
    return out;
  }
  const auto xsum = group_sums(x, group_size);
  Int4Operands g{x.data_ptr<float>(), xsum.data_ptr<float>(), w.data_ptr<uint8_t>(), step.data_ptr<float>(),
                 offset.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
                 out.data_ptr<float>(), Kp, group_size, N, nullptr, nullptr, nullptr};
  auto in_blocks = [&](auto rows) {  // rows(n0, n1): every row of x against channels [n0, n1), blocks in parallel
    at::parallel_for(0, (N + kChannelBlock - 1) / kChannelBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) rows(b * kChannelBlock, std::min(N, (b + 1) * kChannelBlock));
    });
  };
#if defined(ACCEL_X86_AVX2)
  if (cpu_has_avx2()) {
    // ATen's buffers start on 64 bytes, so no 32-byte load of digits straddles two cache lines (a std::vector's
    // 16-byte start made half of them do so, and the kernel's loop 1.7x slower with the weights in L1)
    const auto digits = at::empty({M, 3 * Kp}, x.options().dtype(at::kChar));
    std::vector<int16_t> centre;
    std::vector<double> unit;
    split_rows(x, group_size, digits, centre, unit);
    g.digits = digits.data_ptr<int8_t>(), g.centre = centre.data(), g.unit = unit.data();
    in_blocks([&](int64_t n0, int64_t n1) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) int4_rows_avx2<2>(g, m, n0, n1);
      for (; m < M; ++m) int4_rows_avx2<1>(g, m, n0, n1);
    });
    for (int64_t m = 0; m < M; ++m)  // rows with NaN or Inf: in floats, which carry them into the output
      if (std::isnan(unit[m]))
        for (int64_t n = 0; n < N; ++n) int4_row_portable(g, m, n);
    return out;
  }
#endif
  in_blocks([&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) int4_row_portable(g, m, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int4_linear", &int4_linear_cpu);
}

}  // namespace accel
