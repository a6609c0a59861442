// The LSSL Krylov kernel K[h, m, l] = (C_h dA_h^l dB_h)[m], l < L, without the (H, N, L) Krylov tensor.
//
// Per feature h, with a block of c = 2^s steps and J = ceil(L / c) blocks:
//   P = dA^c by s squarings                         s N^3      per-feature products (gemm below)
//   W_i = C dA^i, i < c   (W_{i+1} = W_i dA)        c M N^2    a sequential chain (chain() below)
//   v_j = P^j dB, j < J   (v_{j+1} = P v_j)         J N^2      a sequential chain
//   K[m, j c + i] = W_i[m] . v_j                    L M N      one product per feature
// so the cost is O(s N^3 + c M N^2 + J N^2 + L M N) and the memory O(s N^2 + c M N + J N) per feature; c is
// picked per call to minimise that cost. Each feature's products run in one task with its operands in L1/L2.
//
// The backward recomputes the squarings, W and v, and runs the three recurrences backwards with their
// hand-derived adjoints (see backward_cpu): no autograd through a loop.
//
// Everything is computed in float64, whatever the inputs' dtype: P = dA^c by squaring and its adjoint
// multiply rounding errors by the powers' growth, which float32 would carry into K and the gradients at
// several times the error of L plain float32 mat-vecs (tried: float32 GEMMs fail the numerics rule on dA's
// gradient at L = 1000). ATen's float64 bmm runs these small per-feature shapes at 5-12 GMAC/s on an AVX2 CPU,
// so every product here goes through the register-blocked gemm below instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

struct Plan {
  int64_t H, N, M, L, s, c, J;
};

// The block c = 2^s that minimises the per-feature cost model above.
Plan make_plan(int64_t H, int64_t N, int64_t M, int64_t L) {
  Plan best{H, N, M, L, 0, 1, L};
  double best_cost = -1;
  for (int64_t s = 0; (int64_t{1} << s) <= L; ++s) {
    const int64_t c = int64_t{1} << s, J = (L + c - 1) / c;
    const double cost = double(s) * N * N * N + double(c) * M * N * N + double(J) * N * N + double(L) * M * N;
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best = {H, N, M, L, s, c, J};
  }
  return best;
}

// One product out (R x N) = a (R x K) b (K x N) [+ add (R x N)]. a has any strides (so a transposed operand
// costs no copy: its elements are broadcast one at a time); b's rows are contiguous, `ldb` apart; the rows of
// out and add are `ldo` apart. add may be out itself (each element is read before it is written).
struct Product {
  const double* a;
  int64_t a_row, a_col;
  const double* b;
  int64_t ldb;
  const double* add;
  double* out;
  int64_t ldo, R, K, N;
};

// Columns j0.. of out: the portable path, and the last N % 4 columns of the AVX2 one.
void product_columns(const Product& g, int64_t j0) {
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t j = j0; j < g.N; ++j) {
      double acc = g.add ? g.add[r * g.ldo + j] : 0.0;
      for (int64_t p = 0; p < g.K; ++p) acc += g.a[r * g.a_row + p * g.a_col] * g.b[p * g.ldb + j];
      g.out[r * g.ldo + j] = acc;
    }
}

#if defined(ACCEL_X86_AVX2)

// A ROWS x (4 VECS) tile of out at (r0, j0), its accumulators in registers across the whole sum: per step of
// the sum, VECS loads of b and ROWS broadcasts of a feed ROWS * VECS FMAs. Written with intrinsics: GCC's
// auto-vectorised clones of such loops (target_clones) come out about 4x slower.
template <int ROWS, int VECS>
ACCEL_AVX2 inline void tile_avx2(const Product& g, int64_t r0, int64_t j0) {
  // Locals, not g's fields: GCC otherwise reloads the fields and spills the accumulators every step.
  const double* __restrict a = g.a + r0 * g.a_row;
  const double* __restrict b = g.b + j0;
  const int64_t a_row = g.a_row, a_col = g.a_col, ldb = g.ldb, K = g.K;
  __m256d acc[ROWS][VECS];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm256_setzero_pd();
  for (int64_t p = 0; p < K; ++p) {
    __m256d bv[VECS];
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) bv[v] = _mm256_loadu_pd(b + p * ldb + 4 * v);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m256d ar = _mm256_broadcast_sd(a + r * a_row + p * a_col);
#pragma GCC unroll 16
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm256_fmadd_pd(ar, bv[v], acc[r][v]);
    }
  }
  const double* add = g.add;  // may be out
  double* out = g.out;
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) {
      const int64_t at = (r0 + r) * g.ldo + j0 + 4 * v;
      if (add) acc[r][v] = _mm256_add_pd(acc[r][v], _mm256_loadu_pd(add + at));
      _mm256_storeu_pd(out + at, acc[r][v]);
    }
}

// A single row's 16 columns at j0, the sum split over even and odd p: a chain step (one row) would otherwise
// wait on the FMA latency of a few accumulators.
ACCEL_AVX2 inline void row16_avx2(const Product& g, int64_t r, int64_t j0) {
  const double* __restrict a = g.a + r * g.a_row;
  const double* __restrict b = g.b + j0;
  const int64_t a_col = g.a_col, ldb = g.ldb, K = g.K;
  __m256d even[4], odd[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) even[v] = odd[v] = _mm256_setzero_pd();
  int64_t p = 0;
  for (; p + 2 <= K; p += 2) {
    const __m256d a0 = _mm256_broadcast_sd(a + p * a_col), a1 = _mm256_broadcast_sd(a + (p + 1) * a_col);
    const double *b0 = b + p * ldb, *b1 = b0 + ldb;
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      even[v] = _mm256_fmadd_pd(a0, _mm256_loadu_pd(b0 + 4 * v), even[v]);
      odd[v] = _mm256_fmadd_pd(a1, _mm256_loadu_pd(b1 + 4 * v), odd[v]);
    }
  }
  if (p < K) {
    const __m256d a0 = _mm256_broadcast_sd(a + p * a_col);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) even[v] = _mm256_fmadd_pd(a0, _mm256_loadu_pd(b + p * ldb + 4 * v), even[v]);
  }
  const double* add = g.add;  // may be out
  double* out = g.out;
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const int64_t at = r * g.ldo + j0 + 4 * v;
    __m256d sum = _mm256_add_pd(even[v], odd[v]);
    if (add) sum = _mm256_add_pd(sum, _mm256_loadu_pd(add + at));
    _mm256_storeu_pd(out + at, sum);
  }
}

// Column blocks outermost, so that b's K x 12 panel stays in L1 while the rows pass over it.
template <int VECS>
ACCEL_AVX2 inline void columns_avx2(const Product& g, int64_t j0) {
  int64_t r = 0;
  for (; r + 4 <= g.R; r += 4) tile_avx2<4, VECS>(g, r, j0);
  for (; r < g.R; ++r) tile_avx2<1, VECS>(g, r, j0);
}

ACCEL_AVX2 void product_avx2(const Product& g) {
  int64_t j0 = 0;
  if (g.R < 4) {  // chain steps: rows of 16 columns
    for (; j0 + 16 <= g.N; j0 += 16)
      for (int64_t r = 0; r < g.R; ++r) row16_avx2(g, r, j0);
  }
  for (; j0 + 12 <= g.N; j0 += 12) columns_avx2<3>(g, j0);
  for (; j0 + 4 <= g.N; j0 += 4) columns_avx2<1>(g, j0);
  product_columns(g, j0);
}
#endif

void product(const Product& g) {
#if defined(ACCEL_X86_AVX2)
  if (cpu_has_avx2()) return product_avx2(g);
#endif
  product_columns(g, 0);
}

// x (R x N) times mat (N x N), rows contiguous, into out (which may be add): a step of a chain or a squaring.
void times(const double* x, int64_t R, const double* mat, const double* add, double* out, int64_t N) {
  product({x, N, 1, mat, N, add, out, N, R, N, N});
}

// out (N x R) = x^T, x (R x N) with rows ld apart.
template <typename T>
void transpose(const double* x, int64_t R, int64_t N, int64_t ld, T* out) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) out[n * R + r] = static_cast<T>(x[r * ld + n]);
}

Plan check(const at::Tensor& dA, const at::Tensor& dB, const at::Tensor& C, int64_t L, const char* name) {
  TORCH_CHECK(dA.dim() == 3 && dA.size(1) == dA.size(2), name, ": dA must have shape (H, N, N), got ", dA.sizes());
  const int64_t H = dA.size(0), N = dA.size(1);
  TORCH_CHECK(dB.dim() == 2 && dB.size(0) == H && dB.size(1) == N, name, ": dB must have shape (H, N) = (", H, ", ", N,
              "), got ", dB.sizes());
  TORCH_CHECK(C.dim() == 3 && C.size(0) == H && C.size(2) == N, name, ": C must have shape (H, M, N), got ", C.sizes());
  TORCH_CHECK(L >= 1, name, ": L must be >= 1, got ", L);
  TORCH_CHECK(dA.scalar_type() == dB.scalar_type() && dA.scalar_type() == C.scalar_type() &&
                  (dA.scalar_type() == at::kFloat || dA.scalar_type() == at::kDouble),
              name, ": dA, dB and C must all be float32 or all float64");
  return make_plan(H, N, C.size(1), L);
}

// One feature's working set: the powers S_k = dA^(2^k) (S_s = P), W_i = C dA^i as (c, M, N), the v_j as (J, N),
// and the buffers of the two passes. About 400 KB at N = 64, L = 4096: it stays in the core's L2 while the
// feature is processed, where each product run over all features at once would stream from memory (2x
// slower, measured).
struct Feature {
  const Plan& p;
  std::vector<double> S, W, V, T, grad_W, grad_V, work;

  explicit Feature(const Plan& plan)
      : p(plan), S((plan.s + 1) * plan.N * plan.N), W(plan.c * plan.M * plan.N), V(plan.J * plan.N),
        T(plan.M * plan.J * plan.c), grad_W(plan.c * plan.M * plan.N), grad_V(plan.J * plan.N),
        work(std::max(3 * plan.N * plan.N, plan.N * plan.c)) {}

  double* power(int64_t k) { return S.data() + k * p.N * p.N; }

  // S, W and V from this feature's dA (N x N), dB (N) and C (M x N).
  void run(const double* dA, const double* dB, const double* C) {
    const int64_t N = p.N, MN = p.M * N;
    std::copy(dA, dA + N * N, power(0));
    for (int64_t k = 0; k < p.s; ++k) times(power(k), N, power(k), nullptr, power(k + 1), N);
    std::copy(C, C + MN, W.data());
    // data() + offset, not &W[offset]: with N = 0 (no states) the vectors are empty, and indexing one is undefined
    for (int64_t i = 1; i < p.c; ++i) times(W.data() + (i - 1) * MN, p.M, dA, nullptr, W.data() + i * MN, N);
    double* Pt = work.data();  // v_j^T = v_{j-1}^T P^T
    transpose(power(p.s), N, N, N, Pt);
    std::copy(dB, dB + N, V.data());
    for (int64_t j = 1; j < p.J; ++j) times(V.data() + (j - 1) * N, 1, Pt, nullptr, V.data() + j * N, N);
  }
};

// Runs fn(h, Feature&) for every feature h, one Feature's buffers per task.
template <typename Fn>
void for_each_feature(const Plan& p, Fn fn) {
  at::parallel_for(0, p.H, 1, [&](int64_t h0, int64_t h1) {
    Feature f(p);
    for (int64_t h = h0; h < h1; ++h) fn(h, f);
  });
}

template <typename T>
void forward_typed(const Plan& p, const double* dA, const double* dB, const double* C, T* K) {
  const int64_t N = p.N, M = p.M, c = p.c, J = p.J, L = p.L;
  for_each_feature(p, [&](int64_t h, Feature& f) {
    f.run(dA + h * N * N, dB + h * N, C + h * M * N);
    double* Wt = f.work.data();
    for (int64_t m = 0; m < M; ++m) {
      // K[m, j c + i] = v_j . W_i[m]: V (J x N) times W[:, m]^T (N x c), a (J, c) block laid out as j c + i
      transpose(f.W.data() + m * N, c, N, M * N, Wt);
      product({f.V.data(), N, 1, Wt, c, nullptr, f.T.data(), c, J, N, c});
      std::copy(f.T.begin(), f.T.begin() + L, K + (h * M + m) * L);
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& dA_in, const at::Tensor& dB_in, const at::Tensor& C_in, int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble).contiguous();
  const auto C = C_in.to(at::kDouble).contiguous();
  auto K = at::empty({p.H, p.M, L}, dA_in.options().memory_format(at::MemoryFormat::Contiguous));
  const double *Ap = dA.const_data_ptr<double>(), *Bp = dB.const_data_ptr<double>(), *Cp = C.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krylov_kernel",
                             [&] { forward_typed<scalar_t>(p, Ap, Bp, Cp, K.mutable_data_ptr<scalar_t>()); });
  return K;
}

// From G = dLoss/dK, per feature:
//   dW_i = sum_j G[:, j c + i] v_j^T            dv_j = sum_i W_i^T G[:, j c + i]
//   v chain backwards: a_{J-1} = dv_{J-1}, a_j = dv_j + P^T a_{j+1};  dP = sum_{j>=1} a_j v_{j-1}^T;  d dB = a_0
//   W chain backwards: b_{c-1} = dW_{c-1}, b_i = dW_i + b_{i+1} dA^T;  d dA = sum_{i>=1} W_{i-1}^T b_i;  dC = b_0
//   squarings backwards: g = dP, g <- g S_k^T + S_k^T g for k = s-1 .. 0;  d dA += g
// run on the transposes h = g^T (h <- S_k h + h S_k) and d dA^T, so that every right operand is row-major.
template <typename T>
void backward_typed(const Plan& p, const T* grad, const double* dA, const double* dB, const double* C, T* gA, T* gB,
                    T* gC) {
  const int64_t N = p.N, NN = N * N, M = p.M, MN = M * N, c = p.c, J = p.J, L = p.L, Lp = J * c;
  for_each_feature(p, [&](int64_t h, Feature& f) {
    const double* A = dA + h * NN;
    f.run(A, dB + h * N, C + h * MN);
    double *G = f.T.data(), *dW = f.grad_W.data(), *dV = f.grad_V.data();
    double *hP = f.work.data(), *tmp = hP + NN, *AT = tmp + NN;
    for (int64_t m = 0; m < M; ++m) {
      std::copy(grad + (h * M + m) * L, grad + (h * M + m + 1) * L, G + m * Lp);
      std::fill(G + m * Lp + L, G + (m + 1) * Lp, 0.0);
    }
    for (int64_t m = 0; m < M; ++m) {
      const double* Gm = G + m * Lp;  // (J, c)
      product({Gm, 1, c, f.V.data(), N, nullptr, dW + m * N, MN, c, J, N});         // dW[:, m] = G_m^T V
      product({Gm, c, 1, f.W.data() + m * N, MN, m ? dV : nullptr, dV, N, J, c, N});  // dV += G_m W[:, m]
    }
    // v chain backwards, in place: dV becomes the a_j
    const double* P = f.power(p.s);
    for (int64_t j = J - 2; j >= 0; --j) times(dV + (j + 1) * N, 1, P, dV + j * N, dV + j * N, N);
    std::copy(dV, dV + N, gB + h * N);
    product({f.V.data(), 1, N, dV + N, N, nullptr, hP, N, N, J - 1, N});  // dP^T = sum_{j>=1} v_{j-1} a_j^T
    for (int64_t k = p.s - 1; k >= 0; --k) {
      times(f.power(k), N, hP, nullptr, tmp, N);  // S_k h
      times(hP, N, f.power(k), tmp, tmp, N);      // + h S_k
      std::swap(hP, tmp);
    }
    // W chain backwards, in place: dW becomes the b_i
    transpose(A, N, N, N, AT);
    for (int64_t i = c - 2; i >= 0; --i) times(dW + (i + 1) * MN, M, AT, dW + i * MN, dW + i * MN, N);
    std::copy(dW, dW + MN, gC + h * MN);
    // d dA^T = h + sum_{i>=1} b_i^T W_{i-1}
    product({dW + MN, 1, N, f.W.data(), N, hP, tmp, N, N, (c - 1) * M, N});
    transpose(tmp, N, N, N, gA + h * NN);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_in, const at::Tensor& dA_in,
                                                            const at::Tensor& dB_in, const at::Tensor& C_in,
                                                            int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel_backward");
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == p.H && grad_in.size(1) == p.M && grad_in.size(2) == L &&
                  grad_in.scalar_type() == dA_in.scalar_type(),
              "krylov_kernel_backward: grad must have shape (H, M, L) and dA's dtype");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble).contiguous();
  const auto C = C_in.to(at::kDouble).contiguous(), grad = grad_in.contiguous();
  const auto options = dA_in.options().memory_format(at::MemoryFormat::Contiguous);
  auto gA = at::empty({p.H, p.N, p.N}, options), gB = at::empty({p.H, p.N}, options);
  auto gC = at::empty({p.H, p.M, p.N}, options);
  const double *Ap = dA.const_data_ptr<double>(), *Bp = dB.const_data_ptr<double>(), *Cp = C.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "krylov_kernel_backward", [&] {
    backward_typed<scalar_t>(p, grad.const_data_ptr<scalar_t>(), Ap, Bp, Cp, gA.mutable_data_ptr<scalar_t>(),
                             gB.mutable_data_ptr<scalar_t>(), gC.mutable_data_ptr<scalar_t>());
  });
  return {gA, gB, gC};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("krylov_kernel", &forward_cpu);
  m.impl("krylov_kernel_backward", &backward_cpu);
}

}  // namespace accel
