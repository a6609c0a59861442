// One Runge-Kutta stage input on the CPU, g = y0 + h[:, None] * sum_{j < len(a)} a[j] k[j], and its backward.
//
// y0 (B, D), k (s, B, D) the stage buffer (only the first len(a) stages are read), h (B,), a a row of the
// Butcher tableau. A coefficient that is exactly zero is skipped: its stage is never read.
//
// The adaptive solver calls this about 8 times per step at B = 256, D = 32, so the cost of a call is mostly
// its fixed overhead: one output allocation, no temporaries, and one thread below kParallelWork element
// accesses (an OpenMP fork costs more than such a call's whole loop). Every input is read once and the output
// written once: the terms of an element are summed in registers, in the reference's order
// ((a0 k0 + a1 k1) + a2 k2) + ..., before y0 + h * sum is stored (kMaxTerms stages per pass; tableaus have at
// most 7). The elements are cut into tiles of about kSpan (groups of whole rows when D <= kSpan, else pieces
// of one row), the unit of the parallel loop. The inner loops run over contiguous elements and GCC vectorises
// them (ACCEL_CPU_CLONES: an AVX2 + FMA clone and a baseline one).
//
// Backward: grad_k[j] = a[j] h grad for j < len(a) (0 for a zero coefficient and beyond len(a)), and
// grad_h[b] = sum_d grad[b, d] sum_j a[j] k[j, b, d], summed in double (float32 inputs too), one pass over
// grad and the stages. grad_y0 is grad itself and needs no kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kSpan = 512;              // elements per tile (whole rows, or a piece of a long row)
constexpr int64_t kParallelWork = 1 << 18;  // element accesses per thread, at least, before a call forks
constexpr int kMaxTerms = 8;                // stages summed in registers per pass over the output
constexpr int kLanes = 8;                   // independent accumulators per dot product, so it vectorises

// Over `rows` rows of w elements (row r at offset + r * ld in every tensor), with the M stages ks[j]:
//   out = y0 + h[r] (acc + sum_j a[j] ks[j])   where acc = out when `accumulate`, else 0,
// or, when not `finish`, out = acc + sum_j a[j] ks[j] (the partial sums of a row with more than kMaxTerms
// stages). The M terms of an element are added in registers, in order, so out is written once per M stages:
// adding each stage into the output in turn (a load and a store of out per stage) measured 5-8x slower.
template <typename T, int M>
ACCEL_CPU_CLONES void stage_rows(const T* const* ks, const T* a, const T* y0, const T* h, int64_t rows, int64_t w,
                                 int64_t ld, int64_t offset, bool accumulate, bool finish, T* out) {
  T c[M];
  for (int j = 0; j < M; ++j) c[j] = a[j];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = offset + r * ld;
    const T* p[M];
    for (int j = 0; j < M; ++j) p[j] = ks[j] + o;
    const T* __restrict yr = y0 + o;
    T* __restrict dst = out + o;
    const T hr = h[r];
    if (!accumulate) {
      if (finish) {
#pragma GCC ivdep
        for (int64_t i = 0; i < w; ++i) {
          T acc = c[0] * p[0][i];
          for (int j = 1; j < M; ++j) acc += c[j] * p[j][i];
          dst[i] = yr[i] + hr * acc;
        }
      } else {
#pragma GCC ivdep
        for (int64_t i = 0; i < w; ++i) {
          T acc = c[0] * p[0][i];
          for (int j = 1; j < M; ++j) acc += c[j] * p[j][i];
          dst[i] = acc;
        }
      }
    } else {
#pragma GCC ivdep
      for (int64_t i = 0; i < w; ++i) {
        T acc = dst[i];
        for (int j = 0; j < M; ++j) acc += c[j] * p[j][i];
        dst[i] = finish ? yr[i] + hr * acc : acc;
      }
    }
  }
}

// dots[r] += sum_i g[i] sum_j a[j] ks[j][i] over `rows` rows of w elements (row r at offset + r * ld), in
// double (the stage sum of an element in T, like the reference).
template <typename T, int M>
ACCEL_CPU_CLONES void stage_dot_rows(const T* const* ks, const T* a, const T* g, int64_t rows, int64_t w, int64_t ld,
                                     int64_t offset, double* dots) {
  T c[M];
  for (int j = 0; j < M; ++j) c[j] = a[j];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = offset + r * ld;
    const T* p[M];
    for (int j = 0; j < M; ++j) p[j] = ks[j] + o;
    const T* __restrict gr = g + o;
    double lanes[kLanes] = {};
    double total = 0;
    int64_t i = 0;
    for (; i + kLanes <= w; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        T acc = c[0] * p[0][i + l];
        for (int j = 1; j < M; ++j) acc += c[j] * p[j][i + l];
        lanes[l] += static_cast<double>(gr[i + l]) * static_cast<double>(acc);
      }
    for (; i < w; ++i) {
      T acc = c[0] * p[0][i];
      for (int j = 1; j < M; ++j) acc += c[j] * p[j][i];
      total += static_cast<double>(gr[i]) * static_cast<double>(acc);
    }
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
    dots[r] += total;
  }
}

// stage_rows for any number m >= 1 of stages: kMaxTerms at a time.
template <typename T>
void stage_sum_rows(const T* const* ks, const T* a, int64_t m, const T* y0, const T* h, int64_t rows, int64_t w,
                    int64_t ld, int64_t offset, T* out) {
  for (int64_t j0 = 0; j0 < m; j0 += kMaxTerms) {
    const int64_t mc = std::min<int64_t>(kMaxTerms, m - j0);
    const bool accumulate = j0 > 0, finish = j0 + mc == m;
    switch (mc) {
#define ACCEL_RK_CASE(M) \
  case M: stage_rows<T, M>(ks + j0, a + j0, y0, h, rows, w, ld, offset, accumulate, finish, out); break;
      ACCEL_RK_CASE(1) ACCEL_RK_CASE(2) ACCEL_RK_CASE(3) ACCEL_RK_CASE(4)
      ACCEL_RK_CASE(5) ACCEL_RK_CASE(6) ACCEL_RK_CASE(7) ACCEL_RK_CASE(8)
#undef ACCEL_RK_CASE
    }
  }
}

// stage_dot_rows for any number m >= 1 of stages: kMaxTerms at a time (beyond kMaxTerms, the chunks' dot
// products are added, which rounds differently from a dot with the whole sum only in the last bits).
template <typename T>
void stage_dot(const T* const* ks, const T* a, int64_t m, const T* g, int64_t rows, int64_t w, int64_t ld,
               int64_t offset, double* dots) {
  for (int64_t j0 = 0; j0 < m; j0 += kMaxTerms) {
    switch (std::min<int64_t>(kMaxTerms, m - j0)) {
#define ACCEL_RK_CASE(M) \
  case M: stage_dot_rows<T, M>(ks + j0, a + j0, g, rows, w, ld, offset, dots); break;
      ACCEL_RK_CASE(1) ACCEL_RK_CASE(2) ACCEL_RK_CASE(3) ACCEL_RK_CASE(4)
      ACCEL_RK_CASE(5) ACCEL_RK_CASE(6) ACCEL_RK_CASE(7) ACCEL_RK_CASE(8)
#undef ACCEL_RK_CASE
    }
  }
}

// out[i] = c g[i] over one row's w elements.
template <typename T>
ACCEL_CPU_CLONES void scale_span(const T* __restrict g, T c, int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = c * g[i];
}

// The tiles: groups of `rows` whole rows when D <= kSpan, else rows of `pieces` pieces each; tile t is piece
// t % pieces of group t / pieces.
struct Tiling {
  int64_t B, D, rows, pieces;
  Tiling(int64_t B_, int64_t D_) : B(B_), D(D_) {
    rows = D_ >= kSpan ? 1 : kSpan / std::max<int64_t>(D_, 1);
    pieces = D_ > kSpan ? (D_ + kSpan - 1) / kSpan : 1;
  }
  int64_t groups() const { return D == 0 ? 0 : (B + rows - 1) / rows; }
  int64_t count() const { return groups() * pieces; }
  // tile t covers rows [r0, r1) and columns [c0, c1); its elements are contiguous from r0 * D + c0
  void bounds(int64_t t, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1) const {
    r0 = t / pieces * rows;
    r1 = std::min(B, r0 + rows);
    c0 = t % pieces * kSpan;
    c1 = std::min(D, c0 + kSpan);
  }
  // tiles per thread, at least, for `accesses_per_element` reads and writes of each element
  int64_t grain(int64_t accesses_per_element) const {
    const int64_t per_tile = std::max<int64_t>(1, std::min(D, kSpan) * rows * accesses_per_element);
    return std::max<int64_t>(1, kParallelWork / per_tile);
  }
};

// The nonzero coefficients of a (as T) and their stages.
template <typename T>
struct Terms {
  c10::SmallVector<T, 16> a;
  c10::SmallVector<const T*, 16> k;
  Terms(const at::Tensor& ks, at::ArrayRef<double> coefficients) {
    const int64_t stride = ks.size(1) * ks.size(2);
    const T* base = ks.const_data_ptr<T>();
    for (size_t j = 0; j < coefficients.size(); ++j)
      if (coefficients[j] != 0.0) {
        a.push_back(static_cast<T>(coefficients[j]));
        k.push_back(base + static_cast<int64_t>(j) * stride);
      }
  }
  int64_t size() const { return static_cast<int64_t>(a.size()); }
};

void check(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& k, const at::Tensor& h,
           at::ArrayRef<double> a) {
  TORCH_CHECK(ref.dim() == 2, op, ": ", ref_name, " must have shape (B, D), got ", ref.sizes());
  const int64_t B = ref.size(0), D = ref.size(1);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == B && k.size(2) == D, op, ": k must have shape (s, B, D) = (s, ", B, ", ",
              D, "), got ", k.sizes());
  TORCH_CHECK(h.dim() == 1 && h.size(0) == B, op, ": h must have shape (B,) = (", B, ",), got ", h.sizes());
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op, ": ", ref_name,
              " must be float32 or float64, got ", ref.scalar_type());
  TORCH_CHECK(k.scalar_type() == ref.scalar_type() && h.scalar_type() == ref.scalar_type(), op,
              ": k and h must have ", ref_name, "'s dtype ", ref.scalar_type(), ", got ", k.scalar_type(), " and ",
              h.scalar_type());
  TORCH_CHECK(ref.device().is_cpu() && k.device().is_cpu() && h.device().is_cpu(), op,
              ": every tensor must be on the CPU");
  TORCH_CHECK(static_cast<int64_t>(a.size()) <= k.size(0), op, ": a has ", a.size(),
              " coefficients but k only ", k.size(0), " stages");
}

at::Tensor forward_cpu(const at::Tensor& y0_in, const at::Tensor& k_in, const at::Tensor& h_in,
                       at::ArrayRef<double> a) {
  check("rk_stage", y0_in, "y0", k_in, h_in, a);
  const auto y0 = y0_in.contiguous();
  const int64_t B = y0.size(0), D = y0.size(1);
  auto out = at::empty({B, D}, y0.options());
  const Tiling tiling(B, D);
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "rk_stage", [&] {
    using T = scalar_t;
    const auto k = k_in.contiguous();
    const auto h = h_in.contiguous();
    const Terms<T> terms(k, a);
    const int64_t m = terms.size();
    const T *yp = y0.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    if (m == 0) {  // no stage: a copy of y0
      if (B * D > 0) std::memcpy(op, yp, B * D * sizeof(T));
      return;
    }
    at::parallel_for(0, tiling.count(), tiling.grain(m + 2), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t r0, r1, c0, c1;
        tiling.bounds(t, r0, r1, c0, c1);
        stage_sum_rows<T>(terms.k.data(), terms.a.data(), m, yp, hp + r0, r1 - r0, c1 - c0, D, r0 * D + c0, op);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_in, const at::Tensor& k_in,
                                                const at::Tensor& h_in, at::ArrayRef<double> a) {
  check("rk_stage_backward", grad_in, "grad", k_in, h_in, a);
  const auto grad = grad_in.contiguous();
  const int64_t s = k_in.size(0), B = grad.size(0), D = grad.size(1);
  auto grad_k = at::empty({s, B, D}, grad.options());
  auto grad_h = at::empty({B}, grad.options());
  const Tiling tiling(B, D);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rk_stage_backward", [&] {
    using T = scalar_t;
    const auto k = k_in.contiguous();
    const auto h = h_in.contiguous();
    const Terms<T> terms(k, a);
    const int64_t m = terms.size(), stride = B * D;
    const T *gp = grad.const_data_ptr<T>(), *hp = h.const_data_ptr<T>();
    T *gkp = grad_k.mutable_data_ptr<T>(), *ghp = grad_h.mutable_data_ptr<T>();
    // a[j] for every stage j < s (0 for a zero coefficient and beyond len(a))
    c10::SmallVector<T, 16> coef(s, T(0));
    for (size_t j = 0; j < a.size(); ++j) coef[j] = static_cast<T>(a[j]);
    if (D == 0) std::fill(ghp, ghp + B, T(0));
    // over groups of rows, so that the pieces of a long row (and its grad_h sum) stay on one thread
    const int64_t grain = std::max<int64_t>(1, tiling.grain(s + m + 2) / tiling.pieces);
    at::parallel_for(0, tiling.groups(), grain, [&](int64_t g0, int64_t g1) {
      double dots[kSpan];
      for (int64_t g = g0; g < g1; ++g) {
        int64_t r0, r1, c0, c1;
        tiling.bounds(g * tiling.pieces, r0, r1, c0, c1);
        std::fill(dots, dots + (r1 - r0), 0.0);
        for (int64_t p = 0; p < tiling.pieces; ++p) {
          tiling.bounds(g * tiling.pieces + p, r0, r1, c0, c1);
          const int64_t w = c1 - c0;
          if (m > 0) stage_dot<T>(terms.k.data(), terms.a.data(), m, gp, r1 - r0, w, D, r0 * D + c0, dots);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t e = r * D + c0;
            for (int64_t j = 0; j < s; ++j) {
              T* dst = gkp + j * stride + e;
              if (coef[j] == T(0)) std::fill(dst, dst + w, T(0));
              else scale_span<T>(gp + e, coef[j] * hp[r], w, dst);
            }
          }
        }
        for (int64_t r = r0; r < r1; ++r) ghp[r] = static_cast<T>(dots[r - r0]);
      }
    });
  });
  return {grad_k, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("rk_stage", &forward_cpu);
  m.impl("rk_stage_backward", &backward_cpu);
}

}  // namespace accel
