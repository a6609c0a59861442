// The LSSL Krylov kernel K[h, m, l] = (C_h dA_h^l dB_h)[m], l < L, without the (H, N, L) Krylov tensor.
//
// Per feature h, with a block of c = 2^s steps and J = ceil(L / c) blocks:
//   P = dA^c by s squarings                         s N^3      per-feature products (feature_matmul)
//   W_i = C dA^i, i < c   (W_{i+1} = W_i dA)        c M N^2    a sequential chain (chain() below)
//   v_j = P^j dB, j < J   (v_{j+1} = P v_j)         J N^2      a sequential chain
//   K[m, j c + i] = W_i[m] . v_j                    L M N      one batched GEMM
// so the cost is O(s N^3 + c M N^2 + J N^2 + L M N) and the memory O(s N^2 + c M N + J N) per feature; c is
// picked per call to minimise that cost. The chains run one feature per task with its matrix in L1/L2.
//
// The backward recomputes the squarings, W and v, and runs the three recurrences backwards with their
// hand-derived adjoints (see backward_cpu): no autograd through a loop.
//
// Everything is computed in float64, whatever the inputs' dtype: P = dA^c by squaring and its adjoint
// multiply rounding errors by the powers' growth, which float32 would carry into K and the gradients at
// several times the error of L plain float32 mat-vecs (tried: float32 GEMMs fail the numerics rule on dA's
// gradient at L = 1000).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

constexpr int64_t kCols = 16;  // output columns a chain step keeps in registers

// out (R x N) = x (R x N) mat (N x N) [+ add]: one step of a chain. Portable form.
void step_portable(const double* __restrict x, const double* __restrict mat, const double* __restrict add, int64_t R,
                   int64_t N, double* __restrict out) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < N; ++j) {
      double acc = add ? add[r * N + j] : 0.0;
      for (int64_t p = 0; p < N; ++p) acc += x[r * N + p] * mat[p * N + j];
      out[r * N + j] = acc;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX2 + FMA: kCols output columns in four registers across the whole sum, so each element of
// mat is loaded once and nothing is stored until the column block is done. Written with intrinsics: GCC's
// auto-vectorised clones of this loop (target_clones) come out about 4x slower.
__attribute__((target("avx2,fma"))) void step_avx2(const double* __restrict x, const double* __restrict mat,
                                                    const double* __restrict add, int64_t R, int64_t N,
                                                    double* __restrict out) {
  for (int64_t r = 0; r < R; ++r) {
    const double* xr = x + r * N;
    int64_t j0 = 0;
    for (; j0 + kCols <= N; j0 += kCols) {
      __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t p = 0; p < N; ++p) {
        const __m256d xp = _mm256_broadcast_sd(xr + p);
        const double* row = mat + p * N + j0;
        a0 = _mm256_fmadd_pd(xp, _mm256_loadu_pd(row), a0);
        a1 = _mm256_fmadd_pd(xp, _mm256_loadu_pd(row + 4), a1);
        a2 = _mm256_fmadd_pd(xp, _mm256_loadu_pd(row + 8), a2);
        a3 = _mm256_fmadd_pd(xp, _mm256_loadu_pd(row + 12), a3);
      }
      if (add) {
        const double* ad = add + r * N + j0;
        a0 = _mm256_add_pd(a0, _mm256_loadu_pd(ad));
        a1 = _mm256_add_pd(a1, _mm256_loadu_pd(ad + 4));
        a2 = _mm256_add_pd(a2, _mm256_loadu_pd(ad + 8));
        a3 = _mm256_add_pd(a3, _mm256_loadu_pd(ad + 12));
      }
      double* o = out + r * N + j0;
      _mm256_storeu_pd(o, a0);
      _mm256_storeu_pd(o + 4, a1);
      _mm256_storeu_pd(o + 8, a2);
      _mm256_storeu_pd(o + 12, a3);
    }
    for (int64_t j = j0; j < N; ++j) {
      double acc = add ? add[r * N + j] : 0.0;
      for (int64_t p = 0; p < N; ++p) acc += xr[p] * mat[p * N + j];
      out[r * N + j] = acc;
    }
  }
}
#endif

void step(const double* x, const double* mat, const double* add, int64_t R, int64_t N, double* out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return step_avx2(x, mat, add, R, N, out);
#endif
  step_portable(x, mat, add, R, N, out);
}

// The row-vector recurrence out[:, 0] = x0, out[:, t] = out[:, t - 1] mat + adds[:, t] for t < T, per feature:
// x0 (H, R, N), mat (H, N, N), adds (H, T, R, N) or undefined; returns (H, T, R, N), float64.
at::Tensor chain(const at::Tensor& x0_in, const at::Tensor& mat_in, const at::Tensor& adds_in, int64_t T) {
  const auto x0 = x0_in.contiguous(), mat = mat_in.contiguous();
  const auto adds = adds_in.defined() ? adds_in.contiguous() : adds_in;
  const int64_t H = x0.size(0), R = x0.size(1), N = x0.size(2), RN = R * N;
  auto out = at::empty({H, T, R, N}, x0.options());
  const double *xp = x0.const_data_ptr<double>(), *mp = mat.const_data_ptr<double>();
  const double* ap = adds.defined() ? adds.const_data_ptr<double>() : nullptr;
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      double* o = op + h * T * RN;
      std::copy(xp + h * RN, xp + (h + 1) * RN, o);
      for (int64_t t = 1; t < T; ++t)
        step(o + (t - 1) * RN, mp + h * N * N, ap ? ap + (h * T + t) * RN : nullptr, R, N, o + t * RN);
    }
  });
  return out;
}

// a (H, R, N) times b (H, N, N), per feature, with the chain step's register-blocked product: about 4x
// faster than ATen's float64 bmm at N = 64 on AVX2 CPUs, where these products dominate the backward.
at::Tensor feature_matmul(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t H = a.size(0), R = a.size(1), N = a.size(2);
  auto out = at::empty({H, R, N}, a.options());
  const double *ap = a.const_data_ptr<double>(), *bp = b.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) step(ap + h * R * N, bp + h * N * N, nullptr, R, N, op + h * R * N);
  });
  return out;
}

// S_0 = dA, S_{k+1} = S_k S_k: the powers dA^(2^k), k = 0..s.
std::vector<at::Tensor> squarings(const at::Tensor& dA, int64_t s) {
  std::vector<at::Tensor> S{dA};
  for (int64_t k = 0; k < s; ++k) S.push_back(feature_matmul(S.back(), S.back()));
  return S;
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

at::Tensor forward_cpu(const at::Tensor& dA_in, const at::Tensor& dB_in, const at::Tensor& C_in, int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble), C = C_in.to(at::kDouble);
  const auto S = squarings(dA, p.s);
  const auto W = chain(C, dA, {}, p.c);                                                   // (H, c, M, N)
  const auto V = chain(dB.unsqueeze(1), S.back().transpose(1, 2), {}, p.J).squeeze(2);  // (H, J, N)
  // K[m, j c + i] = W_i[m] . v_j: (H, c M, J), reordered to (H, M, J, c) = (H, M, J c)
  const auto prod = at::matmul(W.view({p.H, p.c * p.M, p.N}), V.transpose(1, 2));
  const auto K = prod.view({p.H, p.c, p.M, p.J}).permute({0, 2, 3, 1}).reshape({p.H, p.M, p.J * p.c});
  return K.narrow(2, 0, L).to(dA_in.scalar_type()).contiguous();
}

// From G = dLoss/dK:
//   dW_i = sum_j G[:, j c + i] v_j^T            dv_j = sum_i W_i^T G[:, j c + i]
//   v chain backwards: a_{J-1} = dv_{J-1}, a_{j-1} = dv_{j-1} + P^T a_j;  dP = sum_{j>=1} a_j v_{j-1}^T;  d dB = a_0
//   W chain backwards: b_{c-1} = dW_{c-1}, b_{i-1} = dW_{i-1} + b_i dA^T;  d dA = sum_{i>=1} W_{i-1}^T b_i;  dC = b_0
//   squarings backwards: g = dP, g <- g S_k^T + S_k^T g for k = s-1 .. 0;  d dA += g
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& dA_in,
                                                            const at::Tensor& dB_in, const at::Tensor& C_in,
                                                            int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel_backward");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.H && grad.size(1) == p.M && grad.size(2) == L &&
                  grad.scalar_type() == dA_in.scalar_type(),
              "krylov_kernel_backward: grad must have shape (H, M, L) and dA's dtype");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble), C = C_in.to(at::kDouble);
  const auto S = squarings(dA, p.s);
  const auto& P = S.back();
  const auto W = chain(C, dA, {}, p.c).view({p.H, p.c * p.M, p.N});
  const auto V = chain(dB.unsqueeze(1), P.transpose(1, 2), {}, p.J).squeeze(2);
  // Gr (H, c M, J): G[m, j c + i] at row i M + m, zero past L
  const auto G = at::constant_pad_nd(grad.to(at::kDouble), {0, p.J * p.c - L});
  const auto Gr = G.view({p.H, p.M, p.J, p.c}).permute({0, 3, 1, 2}).reshape({p.H, p.c * p.M, p.J});
  const auto dW = at::matmul(Gr, V).view({p.H, p.c, p.M, p.N});
  const auto dV = at::matmul(Gr.transpose(1, 2), W);  // (H, J, N)

  // v chain: a_rev[:, t] = a_{J-1-t}, the recurrence a <- a P + dv run over the reversed sequence.
  const auto a_rev = chain(dV.select(1, p.J - 1).unsqueeze(1), P, dV.flip({1}).unsqueeze(2), p.J).squeeze(2);
  const auto gB = a_rev.select(1, p.J - 1);
  // dP = [a_1 .. a_{J-1}]^T [v_0 .. v_{J-2}]
  const auto a_later = a_rev.narrow(1, 0, p.J - 1).flip({1});
  auto g = at::matmul(a_later.transpose(1, 2), V.narrow(1, 0, p.J - 1));

  // W chain: b_rev[:, t] = b_{c-1-t}, the recurrence b <- b dA^T + dW over the reversed sequence.
  const auto b_rev = chain(dW.select(1, p.c - 1), dA.transpose(1, 2), dW.flip({1}), p.c);
  const auto gC = b_rev.select(1, p.c - 1);
  const auto b_later = b_rev.narrow(1, 0, p.c - 1).flip({1}).reshape({p.H, (p.c - 1) * p.M, p.N});
  auto gA = at::matmul(W.narrow(1, 0, (p.c - 1) * p.M).transpose(1, 2), b_later);

  for (int64_t k = p.s - 1; k >= 0; --k) {
    const auto ST = S[k].transpose(1, 2).contiguous();
    g = feature_matmul(g, ST) + feature_matmul(ST, g);
  }
  gA = gA + g;
  const auto dtype = dA_in.scalar_type();
  return {gA.to(dtype).contiguous(), gB.to(dtype).contiguous(), gC.to(dtype).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("krylov_kernel", &forward_cpu);
  m.impl("krylov_kernel_backward", &backward_cpu);
}

}  // namespace accel
