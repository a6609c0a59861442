// The Hopfield update steps and retrieval (accel/ops/hopfield_update.py) on the CPU, forward and backward.
//
// Same computation as the op's PyTorch kernel, organised for the cache: one task per (batch, head), and
// within it blocks of state patterns whose logits (rows x S) take at most kBlockElements values, so each
// step's logits, softmax and products stay in cache instead of streaming the L x S tensor of all heads through
// memory several times per step. Each block runs on raw pointers: the products through cpublas::brgemm (one
// thread each inside the parallel loop), everything between them in as few passes per row as the data allows:
// - the forward's softmax: a max pass and one exp pass, with a vectorised exp for float32 (ATen's softmax took
//   70% of a product's time at 256 x 1024 x 64, most of it in exp); its 1/sum scales the (rows, width) product;
// - the backward rebuilds P from the logits, shifted by the saved row maximum, in the pass that takes <P, dP>,
//   then writes dS = P (dP - <P, dP>) in place in dP: two passes where recomputing the softmax took five;
// - an update step's backward pairs its products: one for the logits and dP, [q_t; dq] k^T, one for both of
//   k's gradient terms (see backward_impl);
// - the stored patterns' gradients accumulate transposed, (d, S) += (n, d)^T (n, S): MKL runs that at
//   37 GMAC/s against 27 for (S, d) += (n, S)^T (n, d) (PatternGradient; at::addmm_, where brgemm's
//   microkernel ran 0.6x MKL's at (64 x 512) (512 x 1024)).
// Every reduction across tasks (beta's gradient, the gradient of stored patterns shared by the batch) goes
// through per-task buffers summed in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kBlockElements = int64_t{1} << 18;  // logits of one block of rows: 1 MiB in float32

int64_t block_rows(int64_t L, int64_t S) { return std::max<int64_t>(1, std::min(L, kBlockElements / std::max<int64_t>(1, S))); }

// ---- One row of S logits: the softmax's exponentials (returning the log-sum-exp), and its backward ----
//
// The forward leaves the exponentials e^(x - max) unnormalised and keeps the row's statistics (max, 1/sum); the
// 1/sum is applied to the (rows, d) product instead of the (rows, S) association. The backward rebuilds P from
// the recomputed logits as e^(x - max) normalised by their own sum, in the pass that takes <P, dP>. It does not
// reuse the forward's 1/sum: a product of the same operands may round differently the second time (MKL's sgemm
// rounds by the operands' alignment), and the forward's sum does not normalise the new logits, so a sharp row's
// largest weight would carry the logits' whole rounding error, which grows with beta; a softmax of its own
// logits cancels the error they share. A row whose logits are all -inf (every stored pattern masked) or hold a
// NaN gives NaN, as in torch.softmax.

template <typename T>
std::pair<T, T> exp_row_portable(T* x, int64_t S) {  // (max, sum of the exponentials)
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < S; ++i) top = std::max(top, x[i]);
  T sum = 0;
  for (int64_t i = 0; i < S; ++i) sum += (x[i] = std::exp(x[i] - top));
  return {top, sum};
}

template <typename T>
void softmax_backward_row_portable(T* p, T* dp, T top, int64_t S) {
  T sum = 0, dot = 0;
  for (int64_t i = 0; i < S; ++i) {
    const T e = p[i] = std::exp(p[i] - top);
    sum += e;
    dot += e * dp[i];
  }
  const T inv_sum = T(1) / sum;
  dot *= inv_sum;
  for (int64_t i = 0; i < S; ++i) dp[i] = (p[i] *= inv_sum) * (dp[i] - dot);
}

#if defined(ACCEL_X86_AVX2)
// e^x for x <= 0 (a logit minus its row's maximum or log-sum-exp), within 2 ulp: x = n ln 2 + r with
// |r| <= ln 2 / 2, e^r by its degree-7 Taylor-like minimax polynomial (Cephes' expf), 2^n put into the exponent
// bits. Below -87.3, where e^x leaves the normal floats, the result is 0; a NaN stays NaN.
ACCEL_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ);  // true for NaN
  x = _mm256_max_ps(lowest, x);                                // returns x when x is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(two_n)), keep);
}

// A row's sums run in partials of kSumBlock values, each then added to the row's total: float32 rounding then
// grows with S / kSumBlock + kSumBlock / 8 terms per lane instead of S / 8.
constexpr int64_t kSumBlock = 256;

ACCEL_AVX2 std::pair<float, float> exp_row_avx2(float* x, int64_t S) {
  const int64_t S8 = S - S % 8;
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < S8; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
  float top = horizontal_max(top8);
  for (int64_t i = S8; i < S; ++i) top = std::max(top, x[i]);
  const __m256 top_v = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < S8; i0 += kSumBlock) {
    __m256 part = _mm256_setzero_ps();
    for (int64_t i = i0; i < std::min(S8, i0 + kSumBlock); i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), top_v));
      _mm256_storeu_ps(x + i, e);
      part = _mm256_add_ps(part, e);
    }
    sum8 = _mm256_add_ps(sum8, part);
  }
  float sum = horizontal_sum(sum8);
  for (int64_t i = S8; i < S; ++i) sum += (x[i] = std::exp(x[i] - top));
  return {top, sum};
}

ACCEL_AVX2 void softmax_backward_row_avx2(float* p, float* dp, float top, int64_t S) {
  const int64_t S8 = S - S % 8;
  const __m256 top_v = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps(), dot8 = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < S8; i0 += kSumBlock) {  // the forward's exponentials and sum, in its order
    __m256 sum_part = _mm256_setzero_ps(), dot_part = _mm256_setzero_ps();
    for (int64_t i = i0; i < std::min(S8, i0 + kSumBlock); i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + i), top_v));
      _mm256_storeu_ps(p + i, e);
      sum_part = _mm256_add_ps(sum_part, e);
      dot_part = _mm256_fmadd_ps(e, _mm256_loadu_ps(dp + i), dot_part);
    }
    sum8 = _mm256_add_ps(sum8, sum_part);
    dot8 = _mm256_add_ps(dot8, dot_part);
  }
  float sum = horizontal_sum(sum8), dot = horizontal_sum(dot8);
  for (int64_t i = S8; i < S; ++i) {
    const float e = p[i] = std::exp(p[i] - top);
    sum += e;
    dot += e * dp[i];
  }
  const float inv_sum = 1.0f / sum;
  dot *= inv_sum;
  const __m256 inv_v = _mm256_set1_ps(inv_sum), dot_v = _mm256_set1_ps(dot);
  for (int64_t i = 0; i < S8; i += 8) {
    const __m256 prob = _mm256_mul_ps(_mm256_loadu_ps(p + i), inv_v);
    _mm256_storeu_ps(p + i, prob);
    _mm256_storeu_ps(dp + i, _mm256_mul_ps(prob, _mm256_sub_ps(_mm256_loadu_ps(dp + i), dot_v)));
  }
  for (int64_t i = S8; i < S; ++i) dp[i] = (p[i] *= inv_sum) * (dp[i] - dot);
}
#endif

// x <- e^(x - rowmax) over each row of the logits x (n, S) contiguous, in place; each row's statistics
// (max, 1/sum) into stats (n, 2) and its 1/sum also into inv_sum (n).
template <typename T>
void exp_rows(T* x, int64_t n, int64_t S, T* stats, T* inv_sum) {
  for (int64_t r = 0; r < n; ++r) {
    std::pair<T, T> top_sum;
#if defined(ACCEL_X86_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      top_sum = cpu_has_avx2() ? exp_row_avx2(x + r * S, S) : exp_row_portable(x + r * S, S);
    } else
#endif
      top_sum = exp_row_portable(x + r * S, S);
    stats[2 * r] = top_sum.first;
    stats[2 * r + 1] = inv_sum[r] = T(1) / top_sum.second;
  }
}

// From the logits (n, S) in p, dP (n, S) in dp, both contiguous, and the rows' statistics (n, 2; the maximum is
// the shift): P into p and the softmax's backward dS = P (dP - rowsum(dP P)) into dp.
template <typename T>
void softmax_backward_rows(T* p, T* dp, int64_t n, int64_t S, const T* stats) {
  for (int64_t r = 0; r < n; ++r) {
#if defined(ACCEL_X86_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx2()) {
        softmax_backward_row_avx2(p + r * S, dp + r * S, stats[2 * r], S);
        continue;
      }
    }
#endif
    softmax_backward_row_portable(p + r * S, dp + r * S, stats[2 * r], S);
  }
}

// ---- Blocks of rows as raw row-major arrays ----
//
// A block's products and elementwise steps run on its buffers' pointers: through ATen, each block-step's dozen
// calls (dispatch, shape checks, views, TensorIterator for n x d elements) took 10% of the forward's samples
// (perf, L = S = 1024, d = 64), where SDPA's loop spends 5% outside its products and exponentials.

// c (m, n) = a (m, k) b (k, n), with a and c row-major (leading dimensions lda, ldc) and b of strides (b_row,
// b_col). float with a row-major b goes to cpublas::brgemm (oneDNN's microkernel where the CPU has one, else
// MKL's sgemm) from the pointers; the rest (double, k^T as a view) through at::mm_out.
// brgemm sums the whole reduction in registers, so float32 rounding grows with its length (S in the products
// against the stored patterns); it runs over blocks of kReductionBlock instead, each added to c, as MKL's sgemm
// blocks it.
constexpr int64_t kReductionBlock = 256;

template <typename T>
void matmul(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t b_row, int64_t b_col, T* c,
            int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {  // (brgemm fails on an empty width)
    if (b_col == 1 && m > 0 && n > 0 && k > 0) {
      for (int64_t k0 = 0; k0 < k; k0 += kReductionBlock)
        at::native::cpublas::brgemm(m, n, std::min(kReductionBlock, k - k0), lda, b_row, ldc, k0 > 0, a + k0,
                                    b + k0 * b_row, c, false);
      return;
    }
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::mm_out(out, at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options),
             at::from_blob(const_cast<T*>(b), {k, n}, {b_row, b_col}, options));
}

// A (rows, width) row-major block as a tensor, for the ATen calls that remain (masks, the stopping rule, the
// stored patterns' gradients).
template <typename T>
at::Tensor block(T* data, int64_t rows, int64_t width) {
  return at::from_blob(data, {rows, width}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void scale_into(T* out, const T* x, T factor, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = x[i] * factor;
}

// a . b in double, in eight partial sums (a fixed order) so that the loop vectorizes
template <typename T>
double dot_in_double(const T* a, const T* b, int64_t count) {
  double part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= count; j += 8)
    for (int u = 0; u < 8; ++u) part[u] += static_cast<double>(a[j + u]) * static_cast<double>(b[j + u]);
  double total = 0;
  for (; j < count; ++j) total += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  for (const double x : part) total += x;
  return total;
}

template <typename T>
void scale_rows(T* x, const T* factors, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c) x[r * width + c] *= factors[r];
}

// ---- Per (batch, head) ----

// The (L, S) mask of one (batch, head), a view of the broadcasting (B', H', L', S') additive mask.
std::optional<at::Tensor> head_mask(const std::optional<at::Tensor>& mask, int64_t b, int64_t h, int64_t L, int64_t S) {
  if (!mask.has_value()) return std::nullopt;
  const auto& m = *mask;
  return m.select(0, m.size(0) == 1 ? 0 : b).select(0, m.size(1) == 1 ? 0 : h).expand({L, S});
}

// x^T, copied when at least kCopyRows rows will be multiplied by it.
constexpr int64_t kCopyRows = 64;
at::Tensor transposed(const at::Tensor& x, int64_t rows) { return rows >= kCopyRows ? x.t().contiguous() : x.t(); }

// One (batch, head)'s operands: its stored patterns k (S, d) and k^T (d, S) for the logits, its values v
// (S, dv), and its (L, S) mask. k^T is copied when many rows will read it (MKL's products against the
// transposed view ran 15% slower at L = S = 1024), a view when few do (pooling: one row against 100k stored
// patterns, where the copy would triple the traffic). Stored patterns of batch 1 are shared by every batch element.
struct Head {
  at::Tensor k, kt, v;
  std::optional<at::Tensor> mask;

  Head(const at::Tensor& k_all, const at::Tensor& v_all, const std::optional<at::Tensor>& mask_all, int64_t b,
       int64_t h, int64_t L)
      : k(k_all.select(0, k_all.size(0) == 1 ? 0 : b).select(0, h)),
        kt(transposed(k, L)),
        v(v_all.select(0, v_all.size(0) == 1 ? 0 : b).select(0, h)),
        mask(head_mask(mask_all, b, h, L, k.size(0))) {}

  // out (rows, S) = left (rows, d) k^T
  template <typename T>
  void times_kt(const T* left, int64_t rows, T* out) const {
    matmul<T>(rows, kt.size(1), kt.size(0), left, kt.size(0), kt.data_ptr<T>(), kt.stride(0), kt.stride(1), out,
              kt.size(1));
  }
  // The logits (beta q) k^T + mask of n rows from row r0, from beta q in scaled (n, d), into p (n, S).
  template <typename T>
  void logits(const T* scaled, int64_t n, int64_t r0, T* p) const {
    times_kt(scaled, n, p);
    add_mask(p, n, r0);
  }
  template <typename T>
  void add_mask(T* p, int64_t n, int64_t r0) const {
    if (mask.has_value()) block(p, n, kt.size(1)).add_(mask->narrow(0, r0, n));
  }
};

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "hopfield_update: q, k, v must be (B, H, rows, width)");
  TORCH_CHECK(k.size(0) == 1 || k.size(0) == q.size(0), "hopfield_update: k must have batch 1 or q's batch");
  TORCH_CHECK(k.size(1) == q.size(1) && k.size(3) == q.size(3), "hopfield_update: k must be (B, H, S, d) like q");
  TORCH_CHECK(v.sizes().slice(0, 3) == k.sizes().slice(0, 3), "hopfield_update: v must be (B, H, S, dv) like k");
  TORCH_CHECK(beta.numel() == 1, "hopfield_update: beta must have one element");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  beta.scalar_type() == q.scalar_type(), "hopfield_update: q, k, v and beta must share a dtype");
}

// Where the rows from r0 of (batch b, head h) start in x (B, H, L, width), or in step t of x (steps, B, H, L, width),
// both contiguous.
template <typename T>
T* rows_at(const at::Tensor& x, int64_t b, int64_t h, int64_t r0) {
  return x.data_ptr<T>() + ((b * x.size(1) + h) * x.size(2) + r0) * x.size(3);
}
template <typename T>
T* rows_at(const at::Tensor& x, int64_t t, int64_t b, int64_t h, int64_t r0) {
  return x.data_ptr<T>() + (((t * x.size(1) + b) * x.size(2) + h) * x.size(3) + r0) * x.size(4);
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, T beta, int64_t steps,
                  const std::optional<at::Tensor>& mask, std::optional<double> eps, bool return_association,
                  const at::Tensor& out, const at::Tensor& assoc, const at::Tensor& saved_q,
                  const at::Tensor& stats, const at::Tensor& taken) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3), S = k.size(2), dv = v.size(3);
  const int64_t rows = block_rows(L, S);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    // Below autograd and the view tracking, per thread: the ATen calls in here are kernels' insides
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto p_buffer = at::empty({rows, S}, q.options());
    auto scaled_buffer = at::empty({rows, d}, q.options());
    auto inv_sum_buffer = at::empty({rows}, q.options());
    T* const p = p_buffer.data_ptr<T>();
    T* const scaled = scaled_buffer.data_ptr<T>();
    T* const inv_sum = inv_sum_buffer.data_ptr<T>();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const Head head(k, v, mask, b, h, L);
      for (int64_t r0 = 0; r0 < L; r0 += rows) {
        const int64_t n = std::min(rows, L - r0);
        // q_t is step t of saved_q: each update writes q_{t+1} there
        std::copy_n(rows_at<T>(q, b, h, r0), n * d, rows_at<T>(saved_q, 0, b, h, r0));
        at::Tensor active, previous;  // the stopping rule's state
        if (eps.has_value()) active = at::ones({n}, q.options().dtype(at::kBool));
        for (int64_t t = 0; t <= steps; ++t) {
          T* const qt = rows_at<T>(saved_q, t, b, h, r0);
          scale_into(scaled, qt, beta, n * d);  // beta scales the n x d side, not the n x S one
          head.logits(scaled, n, r0, p);
          exp_rows<T>(p, n, S, rows_at<T>(stats, t, b, h, r0), inv_sum);
          // P = diag(1/sum) E: the 1/sum scales the (n, width) product, unless P itself is needed
          const bool retrieval = t == steps, need_p = retrieval ? return_association : eps.has_value();
          if (need_p) scale_rows(p, inv_sum, n, S);
          const int64_t width = retrieval ? dv : d;
          T* const product = retrieval ? rows_at<T>(out, b, h, r0) : rows_at<T>(saved_q, t + 1, b, h, r0);
          matmul<T>(n, width, S, p, S, (retrieval ? head.v : head.k).template data_ptr<T>(), width, 1, product, width);
          if (!need_p) scale_rows(product, inv_sum, n, width);
          if (retrieval) {
            if (return_association) std::copy_n(p, n * S, rows_at<T>(assoc, b, h, r0));
            break;
          }
          if (eps.has_value()) {  // the row's last update changed its association by less than eps
            const auto p_now = block(p, n, S);
            if (previous.defined())
              active &= at::linalg_vector_norm(p_now - previous, 2, at::IntArrayRef{-1}, false, std::nullopt) >= *eps;
            previous = p_now.clone();
            auto q_next = block(product, n, d);
            q_next.copy_(at::where(active.unsqueeze(-1), q_next, block(qt, n, d)));
            block(taken.data_ptr<int64_t>() + (b * H + h) * L + r0, 1, n).add_(active);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& beta, int64_t steps,
    const std::optional<at::Tensor>& mask, std::optional<double> eps, bool return_association) {
  check(q_in, k_in, v_in, beta);
  TORCH_CHECK(steps >= 0, "hopfield_update: steps must be >= 0, got ", steps);
  at::NoGradGuard no_grad;  // a kernel: the op's autograd formula is registered in Python
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3), S = k.size(2), dv = v.size(3);
  auto saved_q = at::empty({steps + 1, B, H, L, d}, q.options());
  auto stats = at::empty({steps + 1, B, H, L, 2}, q.options());
  // updates taken per row: all of them without the stopping rule, else counted as the rows go
  auto taken = at::full({B, H, L}, eps.has_value() ? 0 : steps, q.options().dtype(at::kLong));
  auto out = at::empty({B, H, L, dv}, q.options());
  auto assoc = return_association ? at::empty({B, H, L, S}, q.options()) : q.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hopfield_update", [&] {
    forward_impl<scalar_t>(q, k, v, beta.item<scalar_t>(), steps, mask, eps, return_association, out, assoc, saved_q,
                           stats, taken);
  });
  return {out, assoc, saved_q, stats, taken};
}

// Adds left^T right to the gradient of one head's stored patterns or values, for left (n, w) and right (n, S):
// into its transposed (w, S) buffer when there are many rows (see the file's comment), else straight into the
// (S, w) gradient (pooling: one row against S = 100k, where transposing the buffer back would cost more than the
// products). The first product writes instead of adding to zeros: at S = 100k each pass over the gradient is as
// much traffic as a pass over the stored patterns.
struct PatternGradient {
  at::Tensor transposed, direct;
  bool written = false;

  PatternGradient(const at::Tensor& grad, int64_t L) {
    if (L >= kCopyRows) transposed = at::empty({grad.size(1), grad.size(0)}, grad.options());
    else direct = grad;
  }
  void add(const at::Tensor& left, const at::Tensor& right) {
    auto& out = transposed.defined() ? transposed : direct;
    const auto& a = transposed.defined() ? left.t() : right.t();
    const auto& b = transposed.defined() ? right : left;
    if (written) out.addmm_(a, b);
    else at::mm_out(out, a, b);
    written = true;
  }
  void finish(const at::Tensor& grad) const {
    if (!written) grad.zero_();
    else if (transposed.defined()) grad.copy_(transposed.t());
  }
};

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& k, const at::Tensor& v, T beta,
                   const std::optional<at::Tensor>& mask, const at::Tensor& saved_q, const at::Tensor& stats,
                   const at::Tensor& taken, const at::Tensor& grad_q, const at::Tensor& grad_k,
                   const at::Tensor& grad_v, const at::Tensor& grad_beta) {
  const int64_t steps = saved_q.size(0) - 1;
  const int64_t B = grad_q.size(0), H = grad_q.size(1), L = grad_q.size(2), d = grad_q.size(3);
  const int64_t S = k.size(2), dv = v.size(3);
  const int64_t rows = block_rows(L, S);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    // Below autograd and the view tracking, per thread: the ATen calls in here are kernels' insides
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // y = [p; ds] (2n, S): the logits, then P, in p; dP, then dS, in ds. x = [dq; scaled; dq] (3n, d): beta q_t
    // in the middle, an update step's incoming gradient on both sides. So an update step's products pair up:
    // x[n:3n] k^T = [logits; dP] is one product, and x[0:2n]^T y = dq^T P + (beta q_t)^T dS, k's two gradient
    // terms, another.
    auto y_buffer = at::empty({2 * rows, S}, grad_q.options());
    auto x_buffer = at::empty({3 * rows, d}, grad_q.options());
    auto ds_k_buffer = at::empty({rows, d}, grad_q.options());
    auto dq_buffer = at::empty({rows, d}, grad_q.options());
    T* const ds_k = ds_k_buffer.data_ptr<T>();
    T* const dq = dq_buffer.data_ptr<T>();  // the gradient of q_t, from step t on
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const Head head(k, v, mask, b, h, L);
      const auto vt = transposed(head.v, L);
      const auto gk_out = grad_k.select(0, b).select(0, h), gv_out = grad_v.select(0, b).select(0, h);
      PatternGradient gk(gk_out, L), gv(gv_out, L);
      double gbeta = 0;
      for (int64_t r0 = 0; r0 < L; r0 += rows) {
        const int64_t n = std::min(rows, L - r0);
        T* const p = y_buffer.data_ptr<T>();
        T* const ds = p + n * S;
        T* const x = x_buffer.data_ptr<T>();
        T* const scaled = x + n * d;
        const int64_t* const rows_taken = taken.data_ptr<int64_t>() + (b * H + h) * L + r0;
        // From P in p and dS in ds, the softmax's backward of the logits = beta q_t k^T + mask: beta's gradient
        // sum dS o (q_t k^T) = sum q_t . (dS k), and q_t's beta dS k, into dq for the rows still updating at
        // step t (the rows that had stopped carry their dq through).
        auto logits_backward = [&](int64_t t) {
          matmul<T>(n, d, S, ds, S, head.k.template data_ptr<T>(), d, 1, ds_k, d);
          const T* const qt = rows_at<T>(saved_q, t, b, h, r0);
          gbeta += dot_in_double(qt, ds_k, n * d);
          for (int64_t r = 0; r < n; ++r)
            if (t == steps || rows_taken[r] > t) scale_into(dq + r * d, ds_k + r * d, beta, d);
        };
        // the retrieval out = P_T V: its dP = grad v^T, k's gradient (beta q_T)^T dS, v's P^T grad
        T* const g = rows_at<T>(grad, b, h, r0);
        scale_into(scaled, rows_at<T>(saved_q, steps, b, h, r0), beta, n * d);
        head.logits(scaled, n, r0, p);
        matmul<T>(n, S, dv, g, dv, vt.template data_ptr<T>(), vt.stride(0), vt.stride(1), ds, S);
        softmax_backward_rows<T>(p, ds, n, S, rows_at<T>(stats, steps, b, h, r0));
        logits_backward(steps);
        gk.add(block(scaled, n, d), block(ds, n, S));
        gv.add(block(g, n, dv), block(p, n, S));
        for (int64_t t = steps - 1; t >= 0; --t) {
          // q_{t+1} = P_t k for the rows still updating at step t: their dq goes into both dq slots of x
          for (int64_t r = 0; r < n; ++r) {
            T* const slot = x + r * d;
            if (rows_taken[r] > t) std::copy_n(dq + r * d, d, slot);
            else std::fill_n(slot, d, T(0));
            std::copy_n(slot, d, slot + 2 * n * d);
          }
          scale_into(scaled, rows_at<T>(saved_q, t, b, h, r0), beta, n * d);
          head.times_kt(scaled, 2 * n, p);  // [logits; dP], the mask added to the logits
          head.add_mask(p, n, r0);
          softmax_backward_rows<T>(p, ds, n, S, rows_at<T>(stats, t, b, h, r0));
          logits_backward(t);
          gk.add(block(x, 2 * n, d), block(p, 2 * n, S));
        }
        std::copy_n(dq, n * d, rows_at<T>(grad_q, b, h, r0));
      }
      gk.finish(gk_out);
      gv.finish(gv_out);
      grad_beta.select(0, b).select(0, h).fill_(gbeta);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& beta,
    const std::optional<at::Tensor>& mask, const at::Tensor& saved_q, const at::Tensor& stats, const at::Tensor& taken) {
  check(q, k_in, v_in, beta);
  at::NoGradGuard no_grad;
  const auto k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3), S = k.size(2), dv = v.size(3);
  auto grad_q = at::empty({B, H, L, d}, q.options());
  auto grad_k = at::empty({B, H, S, d}, k.options());  // per batch element; summed below when k is shared
  auto grad_v = at::empty({B, H, S, dv}, v.options());
  auto grad_beta = at::empty({B, H}, q.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hopfield_update_backward", [&] {
    backward_impl<scalar_t>(grad.contiguous(), k, v, beta.item<scalar_t>(), mask, saved_q.contiguous(),
                            stats.contiguous(), taken.contiguous(), grad_q, grad_k, grad_v, grad_beta);
  });
  if (k.size(0) == 1 && B != 1) {
    grad_k = grad_k.sum(0, true);
    grad_v = grad_v.sum(0, true);
  }
  return {grad_q, grad_k, grad_v, grad_beta.sum().to(beta.scalar_type()).reshape(beta.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("hopfield_update", &forward_cpu);
  m.impl("hopfield_update_backward", &backward_cpu);
}

}  // namespace accel
