// The end of an adaptive Runge-Kutta step on the CPU: per sample, Hairer's error norm and the stiffness
// estimate, in one pass over y0, y1, g_prev and the stages, and their backward.
//
// y0, y1, g_prev (B, D), k (s, B, D), h (B,), b_err (s floats):
//   err = h sum_i b_err[i] k[i],   sc = atol + rtol max(|y0|, |y1|),   r = err / sc,
//   norm = sqrt(S / D) with S = sum_d r^2,
//   rho = sqrt(N) / sqrt(G) with N = sum_d (k[s-1] - k[s-2])^2, G = sum_d (y1 - g_prev)^2 (0 where G = 0).
// The three sums S, N, G are accumulated in double for float32 inputs too (per-element values in the input's
// dtype, as the reference computes them), in kLanes independent lanes so that the loops vectorise. A max that
// meets a NaN returns the NaN, like torch.maximum.
//
// Every input is read once: the error stages' sum e = sum_i b_err[i] k[i] of an element (zero weights skipped) is
// formed in registers, in the reference's order, in the same loop that reads y0, y1, g_prev and the last two
// stages (more than kMaxTerms error stages are summed into an L1 buffer first). The elements are cut into tiles
// as in rk_stage.cpp: groups of whole rows when D <= kSpan, else rows in pieces; a group's rows are summed on one
// thread, so a row's sums never cross threads. Inputs below kParallelWork element accesses run on one thread
// (the solver calls this at B = 256, D = 32).
//
// Backward, for upstream gradients gn (of norm) and gr (of rho), per sample:
//   q = dL/derr = gn r / (D norm sc)            (0 when norm = 0: the norm's gradient at 0 is taken as 0)
//   dL/dk[i] = b_err[i] h q,   dL/dh = sum_d e q,   dL/dsc = -q r, reaching y0 or y1 through rtol and the max
//   (whichever of |y0|, |y1| is larger; half each at a tie, like torch.maximum; sgn(0) = 0, like abs),
//   dL/dk[s-1] += gr (k[s-1] - k[s-2]) / (sqrt(N) sqrt(G)),  dL/dk[s-2] -= the same,
//   dL/dy1 -= gr rho (y1 - g_prev) / G,  dL/dg_prev += the same   (all 0 when G = 0 or N = 0).
// It sums S, N, G in a first pass over the row (the forward's loop) and writes the gradients in a second; at
// D <= kSpan the tile is still in L1 then, so this too is one pass over memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kSpan = 512;              // elements per tile: its buffers stay in L1
constexpr int64_t kParallelWork = 1 << 18;  // element accesses per thread, at least, before a call forks
constexpr int kMaxTerms = 8;                // error stages summed in registers; more go through a buffer
constexpr int kLanes = 8;                   // independent accumulators per sum, so the loops vectorise

// max(a, b) for a, b >= 0 or NaN, returning a NaN when either is one (torch.maximum's rule).
template <typename T>
inline T nan_max(T a, T b) {
  return ((a < b) | (b != b)) ? b : a;  // `|`, not `||`: no branch, so the loops stay vectorisable
}

template <typename T>
inline T sgn(T x) {
  return static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
}

// acc + c[J] p[J][i] + ... + c[M-1] p[M-1][i], added in order, as straight-line code.
template <typename T, int M, int J>
inline T add_terms(T acc, const T* c, const T* const* p, int64_t i) {
  if constexpr (J < M) {
    return add_terms<T, M, J + 1>(acc + c[J] * p[J][i], c, p, i);
  } else {
    return acc;
  }
}

// The error stages' sum e = sum_j c[j] p[j][i] of one element, in registers and in order: M stages, or
// e = buf[i] (M = -1: more than kMaxTerms stages, summed beforehand by fill_errors), or 0 (M = 0).
template <typename T, int M>
inline T error_sum(const T* c, const T* const* p, const T* buf, int64_t i) {
  if constexpr (M < 0) {
    return buf[i];
  } else if constexpr (M == 0) {
    return T(0);
  } else {
    return add_terms<T, M, 1>(c[0] * p[0][i], c, p, i);
  }
}

// The per-row pointers of error_sum: p[j] = ks[j] + o.
template <typename T, int M>
struct RowStages {
  const T* p[M > 0 ? M : 1];
  RowStages(const T* const* ks, int64_t o) {
    for (int j = 0; j < M; ++j) p[j] = ks[j] + o;
  }
};

// buf[r * w + i] (+)= sum_j c[j] ks[j][offset + r * ld + i] over `rows` rows of w elements: the error sums of a
// tile, kMaxTerms stages at a time, when there are more.
template <typename T, int M>
ACCEL_CPU_CLONES void error_rows(const T* const* ks, const T* c, int64_t rows, int64_t w, int64_t ld, int64_t offset,
                                 bool accumulate, T* __restrict buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const RowStages<T, M> st(ks, offset + r * ld);
    T* __restrict dst = buf + r * w;
#pragma GCC ivdep
    for (int64_t i = 0; i < w; ++i) {
      T acc = accumulate ? dst[i] : T(0);
      for (int j = 0; j < M; ++j) acc += c[j] * st.p[j][i];
      dst[i] = acc;
    }
  }
}

// Pointers to one tile's data: rows [r0, r1) x columns [c0, c1) of the (B, D) inputs start at `offset`, and
// row r's h is h[r - r0].
template <typename T>
struct Tile {
  const T *y0, *y1, *gp, *klast, *kprev, *h;
  const T* const* ks;  // the stages with nonzero error weights
  const T* c;          // their weights
  const T* buf;        // the error sums, when summed beforehand into a tile buffer (fill_errors)
  int64_t rows, w, ld, offset;
  T rtol, atol;
};

struct Sums {
  double err2, dk2, dy2;  // S, N, G
};

// Adds each row's S, N and G over the tile into sums[r].
template <typename T, int M>
ACCEL_CPU_CLONES void row_sums(const Tile<T>& t, Sums* sums) {
  const T rtol = t.rtol, atol = t.atol;
  T c[M > 0 ? M : 1];
  for (int j = 0; j < M; ++j) c[j] = t.c[j];
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t o = t.offset + r * t.ld;
    const RowStages<T, M> st(t.ks, o);
    const T *__restrict y0 = t.y0 + o, *__restrict y1 = t.y1 + o, *__restrict gp = t.gp + o,
                        *__restrict kl = t.klast + o, *__restrict kp = t.kprev + o, *buf = t.buf + r * t.w;
    const T h = t.h[r];
    double s[kLanes] = {}, nk[kLanes] = {}, gy[kLanes] = {};
    Sums& out = sums[r];
    int64_t i = 0;
    for (; i + kLanes <= t.w; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const int64_t d = i + l;
        const T e = error_sum<T, M>(c, st.p, buf, d);
        const T rr = h * e / (atol + rtol * nan_max(std::abs(y0[d]), std::abs(y1[d])));
        const T dk = kl[d] - kp[d], dy = y1[d] - gp[d];
        s[l] += static_cast<double>(rr) * static_cast<double>(rr);
        nk[l] += static_cast<double>(dk) * static_cast<double>(dk);
        gy[l] += static_cast<double>(dy) * static_cast<double>(dy);
      }
    for (; i < t.w; ++i) {
      const T e = error_sum<T, M>(c, st.p, buf, i);
      const T rr = h * e / (atol + rtol * nan_max(std::abs(y0[i]), std::abs(y1[i])));
      const T dk = kl[i] - kp[i], dy = y1[i] - gp[i];
      out.err2 += static_cast<double>(rr) * static_cast<double>(rr);
      out.dk2 += static_cast<double>(dk) * static_cast<double>(dk);
      out.dy2 += static_cast<double>(dy) * static_cast<double>(dy);
    }
    for (int l = 0; l < kLanes; ++l) out.err2 += s[l], out.dk2 += nk[l], out.dy2 += gy[l];
  }
}

// The per-sample factors of the backward (see the top).
template <typename T>
struct RowFactors {
  T cn, ck, cy;  // q = cn r / sc; dL/dk[s-1] += ck dk; dL/dy1 -= cy dy
};

template <typename T>
RowFactors<T> row_factors(const Sums& sums, int64_t D, double gn, double gr) {
  const double norm = std::sqrt(sums.err2 / static_cast<double>(D));
  const double num = std::sqrt(sums.dk2), den = std::sqrt(sums.dy2);
  RowFactors<T> f{T(0), T(0), T(0)};
  if (norm != 0) f.cn = static_cast<T>(gn / (static_cast<double>(D) * norm));
  if (den != 0 && num != 0) {  // != 0: a NaN carries through
    f.ck = static_cast<T>(gr / (num * den));
    f.cy = static_cast<T>(gr * num / (den * den * den));
  }
  return f;
}

// One element of row_gradients: writes its gradients, returns e q.
template <typename T>
__attribute__((always_inline)) inline double gradient_element(
    const T* __restrict e_, const T* __restrict y0, const T* __restrict y1, const T* __restrict gp,
    const T* __restrict kl, const T* __restrict kp, T h, T rtol, T atol, T cn, T ck, T cy, int64_t d,
    T* __restrict gy0, T* __restrict gy1, T* __restrict ggp, T* __restrict q, T* __restrict dk) {
  const T e = e_[d];
  const T a0 = std::abs(y0[d]), a1 = std::abs(y1[d]);
  const T sc = atol + rtol * nan_max(a0, a1);
  const T rr = h * e / sc;
  const T qd = cn * rr / sc;
  const T gm = -qd * rr * rtol;  // dL/dmax
  // which of |y0|, |y1| the max took: 1, 0, or half each at a tie (written with sgn: the comparisons as
  // conditionals keep GCC from vectorising the loop)
  const T w0 = T(0.5) + T(0.5) * sgn(a0 - a1);
  const T dy = y1[d] - gp[d];
  gy0[d] = gm * w0 * sgn(y0[d]);
  gy1[d] = gm * (T(1) - w0) * sgn(y1[d]) - cy * dy;
  ggp[d] = cy * dy;
  q[d] = qd;
  dk[d] = ck * (kl[d] - kp[d]);
  return static_cast<double>(e) * static_cast<double>(qd);
}

// The gradients of a tile except the stages': writes gy0, gy1 and ggp (at the inputs' offsets), and into the
// tile buffers q = dL/derr and dk = ck (k[s-1] - k[s-2]) (at r * w + i); adds each row's sum_i e q (its part
// of dL/dh) into dh[r], in double. The error sums e come from the tile buffer t.buf (filled by fill_errors:
// summed in this loop, they kept GCC from vectorising it).
template <typename T>
ACCEL_CPU_CLONES void row_gradients(const Tile<T>& t, const RowFactors<T>* f, T* gy0_out, T* gy1_out, T* ggp_out,
                                    T* q_out, T* dk_out, double* dh) {
  const T rtol = t.rtol, atol = t.atol;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t o = t.offset + r * t.ld, b = r * t.w;
    const T *y0 = t.y0 + o, *y1 = t.y1 + o, *gp = t.gp + o, *kl = t.klast + o, *kp = t.kprev + o, *e = t.buf + b;
    T *gy0 = gy0_out + o, *gy1 = gy1_out + o, *ggp = ggp_out + o, *q = q_out + b, *dk = dk_out + b;
    const T h = t.h[r], cn = f[r].cn, ck = f[r].ck, cy = f[r].cy;
    double total = 0;
    // omp simd: GCC vectorises this loop whole (the sum may be reassociated); as kLanes lanes it did not
#pragma omp simd reduction(+ : total)
    for (int64_t d = 0; d < t.w; ++d)
      total += gradient_element<T>(e, y0, y1, gp, kl, kp, h, rtol, atol, cn, ck, cy, d, gy0, gy1, ggp, q, dk);
    dh[r] += total;
  }
}

// out[i] = c q[i] + sign dk[i] (sign in {-1, 0, 1}).
template <typename T>
ACCEL_CPU_CLONES void stage_gradient(const T* __restrict q, const T* __restrict dk, T c, T sign, int64_t n,
                                     T* __restrict out) {
  if (sign == T(0)) {
    for (int64_t i = 0; i < n; ++i) out[i] = c * q[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = c * q[i] + sign * dk[i];
  }
}

// Fills buf[r * w + i] with the tile's error sums e = sum_j c[j] ks[j] (0 when m = 0), kMaxTerms stages at a
// time, and points t.buf at it.
template <typename T>
void fill_errors(Tile<T>& t, int64_t m, T* buf) {
  if (m == 0) std::fill(buf, buf + t.rows * t.w, T(0));
  for (int64_t j0 = 0; j0 < m; j0 += kMaxTerms) {
    const int64_t mc = std::min<int64_t>(kMaxTerms, m - j0);
    const bool acc = j0 > 0;
    switch (mc) {
#define ACCEL_RK_CASE(M) \
  case M: error_rows<T, M>(t.ks + j0, t.c + j0, t.rows, t.w, t.ld, t.offset, acc, buf); break;
      ACCEL_RK_CASE(1) ACCEL_RK_CASE(2) ACCEL_RK_CASE(3) ACCEL_RK_CASE(4)
      ACCEL_RK_CASE(5) ACCEL_RK_CASE(6) ACCEL_RK_CASE(7) ACCEL_RK_CASE(8)
#undef ACCEL_RK_CASE
    }
  }
  t.buf = buf;
}

// Runs fn(std::integral_constant<int, M>) with M the number m of error stages (0 to kMaxTerms, summed in
// registers), or M = -1 beyond, after fill_errors.
template <typename T, typename Fn>
void with_error_terms(Tile<T>& t, int64_t m, T* buf, Fn&& fn) {
  switch (m) {
    case 0: return fn(std::integral_constant<int, 0>{});
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: break;
  }
  fill_errors<T>(t, m, buf);
  fn(std::integral_constant<int, -1>{});
}

// Tiles as in rk_stage.cpp: groups of `rows` whole rows when D <= kSpan, else rows of `pieces` pieces each.
struct Tiling {
  int64_t B, D, rows, pieces;
  Tiling(int64_t B_, int64_t D_) : B(B_), D(D_) {
    rows = D_ >= kSpan ? 1 : kSpan / std::max<int64_t>(D_, 1);
    pieces = D_ > kSpan ? (D_ + kSpan - 1) / kSpan : 1;
  }
  int64_t groups() const { return (B + rows - 1) / rows; }
  // piece p of group g: rows [r0, r1), columns [c0, c1); its elements are contiguous from r0 * D + c0
  void bounds(int64_t g, int64_t p, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1) const {
    r0 = g * rows;
    r1 = std::min(B, r0 + rows);
    c0 = p * kSpan;
    c1 = std::min(D, c0 + kSpan);
  }
  // groups per thread, at least, for `accesses_per_element` reads and writes of each element
  int64_t grain(int64_t accesses_per_element) const {
    const int64_t per_group = std::max<int64_t>(1, std::max<int64_t>(D, 1) * rows * accesses_per_element);
    return std::max<int64_t>(1, kParallelWork / per_group);
  }
};

void check(const char* op, const at::Tensor& y0, const at::Tensor& y1, const at::Tensor& k, const at::Tensor& g_prev,
           const at::Tensor& h, at::ArrayRef<double> b_err, double rtol, double atol) {
  TORCH_CHECK(y0.dim() == 2, op, ": y0 must have shape (B, D), got ", y0.sizes());
  const int64_t B = y0.size(0), D = y0.size(1);
  TORCH_CHECK(y1.sizes() == y0.sizes(), op, ": y1 must have y0's shape ", y0.sizes(), ", got ", y1.sizes());
  TORCH_CHECK(g_prev.sizes() == y0.sizes(), op, ": g_prev must have y0's shape ", y0.sizes(), ", got ",
              g_prev.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(0) >= 2 && k.size(1) == B && k.size(2) == D, op,
              ": k must have shape (s, B, D) = (s >= 2, ", B, ", ", D, "), got ", k.sizes());
  TORCH_CHECK(h.dim() == 1 && h.size(0) == B, op, ": h must have shape (B,) = (", B, ",), got ", h.sizes());
  TORCH_CHECK(y0.scalar_type() == at::kFloat || y0.scalar_type() == at::kDouble, op,
              ": y0 must be float32 or float64, got ", y0.scalar_type());
  for (const auto* t : {&y1, &k, &g_prev, &h})
    TORCH_CHECK(t->scalar_type() == y0.scalar_type(), op, ": every tensor must have y0's dtype ", y0.scalar_type(),
                ", got ", t->scalar_type());
  for (const auto* t : {&y0, &y1, &k, &g_prev, &h})
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
  TORCH_CHECK(static_cast<int64_t>(b_err.size()) == k.size(0), op, ": b_err must have one weight per stage (",
              k.size(0), "), got ", b_err.size());
  TORCH_CHECK(std::isfinite(rtol) && std::isfinite(atol) && rtol >= 0 && atol >= 0 && (rtol > 0 || atol > 0), op,
              ": rtol and atol must be finite and >= 0, not both 0, got rtol=", rtol, ", atol=", atol);
}

// The nonzero error weights (as T) and their stages.
template <typename T>
struct ErrorTerms {
  c10::SmallVector<T, 16> b;
  c10::SmallVector<const T*, 16> k;
  ErrorTerms(const T* stages, int64_t stride, at::ArrayRef<double> b_err) {
    for (size_t i = 0; i < b_err.size(); ++i)
      if (b_err[i] != 0.0) b.push_back(static_cast<T>(b_err[i])), k.push_back(stages + static_cast<int64_t>(i) * stride);
  }
  int64_t size() const { return static_cast<int64_t>(b.size()); }
};

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& y0_in, const at::Tensor& y1_in,
                                               const at::Tensor& k_in, const at::Tensor& g_prev_in,
                                               const at::Tensor& h_in, at::ArrayRef<double> b_err, double rtol,
                                               double atol) {
  check("rk_finalize", y0_in, y1_in, k_in, g_prev_in, h_in, b_err, rtol, atol);
  const int64_t s = k_in.size(0), B = y0_in.size(0), D = y0_in.size(1), stride = B * D;
  auto norm = at::empty({B}, y0_in.options());
  auto rho = at::empty({B}, y0_in.options());
  const Tiling tiling(B, D);
  AT_DISPATCH_FLOATING_TYPES(y0_in.scalar_type(), "rk_finalize", [&] {
    using T = scalar_t;
    const auto y0 = y0_in.contiguous(), y1 = y1_in.contiguous(), k = k_in.contiguous(), gp = g_prev_in.contiguous(),
               h = h_in.contiguous();
    const ErrorTerms<T> terms(k.const_data_ptr<T>(), stride, b_err);
    const int64_t m = terms.size();
    const T* kp = k.const_data_ptr<T>();
    Tile<T> base{y0.const_data_ptr<T>(), y1.const_data_ptr<T>(), gp.const_data_ptr<T>(), kp + (s - 1) * stride,
                 kp + (s - 2) * stride, h.const_data_ptr<T>(), terms.k.data(), terms.b.data(), nullptr, 0, 0, D, 0,
                 static_cast<T>(rtol), static_cast<T>(atol)};
    T *np = norm.mutable_data_ptr<T>(), *rp = rho.mutable_data_ptr<T>();
    at::parallel_for(0, tiling.groups(), tiling.grain(std::min<int64_t>(m, kMaxTerms) + 5), [&](int64_t g0, int64_t g1) {
      T buf[kSpan];
      Sums sums[kSpan];
      for (int64_t g = g0; g < g1; ++g) {
        int64_t r0, r1, c0, c1;
        tiling.bounds(g, 0, r0, r1, c0, c1);
        std::fill(sums, sums + (r1 - r0), Sums{0, 0, 0});
        for (int64_t p = 0; p < tiling.pieces; ++p) {
          tiling.bounds(g, p, r0, r1, c0, c1);
          Tile<T> t = base;
          t.h += r0, t.rows = r1 - r0, t.w = c1 - c0, t.offset = r0 * D + c0;
          with_error_terms<T>(t, m, buf, [&](auto M) { row_sums<T, decltype(M)::value>(t, sums); });
        }
        for (int64_t r = r0; r < r1; ++r) {
          const Sums& sm = sums[r - r0];
          np[r] = static_cast<T>(std::sqrt(sm.err2 / static_cast<double>(D)));
          rp[r] = sm.dy2 != 0 ? static_cast<T>(std::sqrt(sm.dk2) / std::sqrt(sm.dy2)) : T(0);
        }
      }
    });
  });
  return {norm, rho};
}

// Returns the gradients w.r.t. y0, y1, k, g_prev and h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_norm_in, const at::Tensor& grad_rho_in, const at::Tensor& y0_in, const at::Tensor& y1_in,
    const at::Tensor& k_in, const at::Tensor& g_prev_in, const at::Tensor& h_in, at::ArrayRef<double> b_err,
    double rtol, double atol) {
  check("rk_finalize_backward", y0_in, y1_in, k_in, g_prev_in, h_in, b_err, rtol, atol);
  const int64_t s = k_in.size(0), B = y0_in.size(0), D = y0_in.size(1), stride = B * D;
  for (const auto* t : {&grad_norm_in, &grad_rho_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "rk_finalize_backward: grad_norm and grad_rho must have shape (",
                B, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == y0_in.scalar_type() && t->device().is_cpu(),
                "rk_finalize_backward: grad_norm and grad_rho must have y0's dtype on the CPU");
  }
  auto gy0 = at::empty({B, D}, y0_in.options());
  auto gy1 = at::empty({B, D}, y0_in.options());
  auto gk = at::empty({s, B, D}, y0_in.options());
  auto ggp = at::empty({B, D}, y0_in.options());
  auto gh = at::empty({B}, y0_in.options());
  const Tiling tiling(B, D);
  AT_DISPATCH_FLOATING_TYPES(y0_in.scalar_type(), "rk_finalize_backward", [&] {
    using T = scalar_t;
    const auto y0 = y0_in.contiguous(), y1 = y1_in.contiguous(), k = k_in.contiguous(), gp = g_prev_in.contiguous(),
               h = h_in.contiguous(), gn = grad_norm_in.contiguous(), gr = grad_rho_in.contiguous();
    const ErrorTerms<T> terms(k.const_data_ptr<T>(), stride, b_err);
    const int64_t m = terms.size();
    const T* kp = k.const_data_ptr<T>();
    Tile<T> base{y0.const_data_ptr<T>(), y1.const_data_ptr<T>(), gp.const_data_ptr<T>(), kp + (s - 1) * stride,
                 kp + (s - 2) * stride, h.const_data_ptr<T>(), terms.k.data(), terms.b.data(), nullptr, 0, 0, D, 0,
                 static_cast<T>(rtol), static_cast<T>(atol)};
    const T *hp = h.const_data_ptr<T>(), *gnp = gn.const_data_ptr<T>(), *grp = gr.const_data_ptr<T>();
    T *gy0p = gy0.mutable_data_ptr<T>(), *gy1p = gy1.mutable_data_ptr<T>(), *gkp = gk.mutable_data_ptr<T>(),
      *ggpp = ggp.mutable_data_ptr<T>(), *ghp = gh.mutable_data_ptr<T>();
    // b_err[i] for every stage, and the stiffness term's sign on it
    c10::SmallVector<T, 16> weight(s), sign(s, T(0));
    for (int64_t i = 0; i < s; ++i) weight[i] = static_cast<T>(b_err[i]);
    sign[s - 1] = T(1), sign[s - 2] = T(-1);
    if (D == 0) std::fill(ghp, ghp + B, T(0));
    const int64_t accesses = 2 * std::min<int64_t>(m, kMaxTerms) + s + 11;
    at::parallel_for(0, tiling.groups(), tiling.grain(accesses), [&](int64_t g0, int64_t g1) {
      T buf[kSpan], q[kSpan], dk[kSpan];
      Sums sums[kSpan];
      RowFactors<T> f[kSpan];
      double dh[kSpan];
      for (int64_t g = g0; g < g1; ++g) {
        int64_t r0, r1, c0, c1;
        tiling.bounds(g, 0, r0, r1, c0, c1);
        std::fill(sums, sums + (r1 - r0), Sums{0, 0, 0});
        std::fill(dh, dh + (r1 - r0), 0.0);
        auto tile = [&](int64_t p) {
          tiling.bounds(g, p, r0, r1, c0, c1);
          Tile<T> t = base;
          t.h += r0, t.rows = r1 - r0, t.w = c1 - c0, t.offset = r0 * D + c0;
          return t;
        };
        // pass 1: the sums, from the error sums e that pass 2 reads. Summed in registers here, e could round
        // otherwise (contracted into FMAs or not) than in the buffer, and where e cancels, q = gn r / (D norm sc)
        // with norm from one and r from the other was off by that rounding (D = 1: 40 ulps, not +-1 / sc).
        for (int64_t p = 0; p < tiling.pieces; ++p) {
          Tile<T> t = tile(p);
          fill_errors<T>(t, m, buf);
          row_sums<T, -1>(t, sums);
        }
        for (int64_t r = r0; r < r1; ++r) f[r - r0] = row_factors<T>(sums[r - r0], D, gnp[r], grp[r]);
        // pass 2: the gradients (at D <= kSpan, the tile is still in L1 or L2)
        for (int64_t p = 0; p < tiling.pieces; ++p) {
          Tile<T> t = tile(p);
          if (tiling.pieces > 1) fill_errors<T>(t, m, buf);
          else t.buf = buf;  // one piece: pass 1's error sums are still there
          row_gradients<T>(t, f, gy0p, gy1p, ggpp, q, dk, dh);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t x = r * D + c0, w = c1 - c0, o = (r - r0) * w;
            for (int64_t i = 0; i < s; ++i) {
              T* dst = gkp + i * stride + x;
              if (weight[i] == T(0) && sign[i] == T(0)) std::fill(dst, dst + w, T(0));
              else stage_gradient<T>(q + o, dk + o, weight[i] * hp[r], sign[i], w, dst);
            }
          }
        }
        for (int64_t r = r0; r < r1; ++r) ghp[r] = static_cast<T>(dh[r - r0]);
      }
    });
  });
  return {gy0, gy1, gk, ggp, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("rk_finalize", &forward_cpu);
  m.impl("rk_finalize_backward", &backward_cpu);
}

}  // namespace accel
