// The LSSL Krylov kernel K[h, m, l] = (C_h dA_h^l dB_h)[m], l < L, without the (H, N, L) Krylov tensor.
//
// Per feature h, with a block of c = 2^s steps and J = ceil(L / c) blocks:
//   P = dA^c by s squarings                         s N^3
//   W_i = C dA^i, i < c   (W_{i+1} = W_i dA)        c M N^2
//   v_j = P^j dB, j < J   (v_{j+1} = P v_j)         J N^2
//   K[m, j c + i] = W_i[m] . v_j                    L M N
// so the cost is O(s N^3 + c M N^2 + J N^2 + L M N) and the memory O(s N^2 + c M N + J N) per feature, all of
// it in one thread's cache; c is picked per call to minimise that cost. Features run in parallel.
//
// The backward recomputes P's squarings, W and v, and runs the three recurrences backwards with their
// hand-derived adjoints (see backward_feature): no autograd through a loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// out (n x m) (+)= a (n x k) b (k x m), row-major, in axpy order so the inner loop vectorises; out must not
// alias a or b.
template <typename T>
ACCEL_CPU_CLONES void matmul(const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t n, int64_t k,
                             int64_t m, bool accumulate = false) {
  if (!accumulate) std::fill(out, out + n * m, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < k; ++p) {
      const T aip = a[i * k + p];
      const T* __restrict brow = b + p * m;
      T* __restrict orow = out + i * m;
      for (int64_t j = 0; j < m; ++j) orow[j] += aip * brow[j];
    }
}

// out (n x m) += a^T b with a (k x n), b (k x m).
template <typename T>
ACCEL_CPU_CLONES void add_matmul_tn(const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t n,
                                    int64_t k, int64_t m) {
  for (int64_t p = 0; p < k; ++p)
    for (int64_t i = 0; i < n; ++i) {
      const T api = a[p * n + i];
      const T* __restrict brow = b + p * m;
      T* __restrict orow = out + i * m;
      for (int64_t j = 0; j < m; ++j) orow[j] += api * brow[j];
    }
}

// dst (m x n) = src (n x m)^T
template <typename T>
void transpose(const T* src, T* dst, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) dst[j * n + i] = src[i * m + j];
}

// The forward quantities of one feature: squarings S_0 = dA .. S_s = P, W (c, M, N) and V (J, N).
template <typename T>
struct Feature {
  std::vector<T> S, W, V, PT;
  void compute(const Plan& p, const T* dA, const T* dB, const T* C) {
    const int64_t N = p.N, NN = N * N, MN = p.M * N;
    S.resize((p.s + 1) * NN);
    std::copy(dA, dA + NN, S.data());
    for (int64_t k = 0; k < p.s; ++k) matmul(S.data() + k * NN, S.data() + k * NN, S.data() + (k + 1) * NN, N, N, N);
    W.resize(p.c * MN);
    std::copy(C, C + MN, W.data());
    for (int64_t i = 1; i < p.c; ++i) matmul(W.data() + (i - 1) * MN, dA, W.data() + i * MN, p.M, N, N);
    // v_j = P v_{j-1}, taken as the row vector v_{j-1}^T P^T so that the inner loop runs along a row.
    PT.resize(NN);
    transpose(S.data() + p.s * NN, PT.data(), N, N);
    V.resize(p.J * N);
    std::copy(dB, dB + N, V.data());
    for (int64_t j = 1; j < p.J; ++j) matmul(V.data() + (j - 1) * N, PT.data(), V.data() + j * N, 1, N, N);
  }
};

template <typename T>
void forward_feature(const Plan& p, const T* dA, const T* dB, const T* C, Feature<T>& f, std::vector<T>& prod,
                     T* K) {
  f.compute(p, dA, dB, C);
  // prod (c M x J) = W V^T, then K[m, j c + i] = prod[i M + m, j].
  prod.resize(p.N * p.J + p.c * p.M * p.J);
  T* VT = prod.data() + p.c * p.M * p.J;
  transpose(f.V.data(), VT, p.J, p.N);
  matmul(f.W.data(), VT, prod.data(), p.c * p.M, p.N, p.J);
  for (int64_t i = 0; i < p.c; ++i)
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t j = 0; j < p.J; ++j) {
        const int64_t l = j * p.c + i;
        if (l < p.L) K[m * p.L + l] = prod[(i * p.M + m) * p.J + j];
      }
}

// Gradients of one feature from G = dLoss/dK (M, L):
//   dW_i = sum_j G[:, j c + i] v_j^T            dv_j = sum_i W_i^T G[:, j c + i]
//   v chain, backwards:  a = dv_{J-1};  dP += a v_{j-1}^T, a = dv_{j-1} + P^T a;  d dB = a
//   W chain, backwards:  b = dW_{c-1};  d dA += W_{i-1}^T b, b = dW_{i-1} + b dA^T;  dC = b
//   squarings, backwards: g = dP;  g <- g S_k^T + S_k^T g for k = s-1 .. 0;  d dA += g
template <typename T>
void backward_feature(const Plan& p, const T* G, const T* dA, const T* dB, const T* C, Feature<T>& f,
                      std::vector<T>& scratch, T* gA, T* gB, T* gC) {
  f.compute(p, dA, dB, C);
  const int64_t N = p.N, NN = N * N, M = p.M, MN = M * N, cM = p.c * M;
  scratch.assign(cM * p.J + cM * N + p.J * N + 4 * NN + 2 * N + MN, T(0));  // zeroed: dP accumulates
  T* Gr = scratch.data();   // (c M x J): G[m, j c + i] at row i M + m, 0 past L
  T* dW = Gr + cM * p.J;    // (c M x N)
  T* dV = dW + cM * N;      // (J x N)
  T* dP = dV + p.J * N;     // (N x N)
  T* g = dP + NN;           // (N x N)
  T* g_next = g + NN;       // (N x N)
  T* transposed = g_next + NN;  // (N x N): dA^T, then each S_k^T
  T* a = transposed + NN;   // (N)
  T* a_next = a + N;        // (N)
  T* b_next = a_next + N;   // (M x N)
  for (int64_t i = 0; i < p.c; ++i)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < p.J; ++j) {
        const int64_t l = j * p.c + i;
        Gr[(i * M + m) * p.J + j] = l < p.L ? G[m * p.L + l] : T(0);
      }
  matmul(Gr, f.V.data(), dW, cM, p.J, N);
  add_matmul_tn(Gr, f.W.data(), dV, p.J, cM, N);

  // v chain
  const T* P = f.S.data() + p.s * NN;
  std::copy(dV + (p.J - 1) * N, dV + p.J * N, a);
  for (int64_t j = p.J - 1; j >= 1; --j) {
    add_matmul_tn(a, f.V.data() + (j - 1) * N, dP, N, 1, N);  // outer product a v_{j-1}^T
    std::copy(dV + (j - 1) * N, dV + j * N, a_next);
    matmul(a, P, a_next, 1, N, N, /*accumulate=*/true);  // P^T a, as the row vector a^T P
    std::swap(a, a_next);
  }
  std::copy(a, a + N, gB);

  // W chain: gA starts at zero and collects W_{i-1}^T b.
  std::fill(gA, gA + NN, T(0));
  T* b = gC;  // the running adjoint ends as dC
  std::copy(dW + (p.c - 1) * MN, dW + p.c * MN, b);
  transpose(dA, transposed, N, N);
  for (int64_t i = p.c - 1; i >= 1; --i) {
    add_matmul_tn(f.W.data() + (i - 1) * MN, b, gA, N, M, N);
    std::copy(dW + (i - 1) * MN, dW + i * MN, b_next);
    matmul(b, transposed, b_next, M, N, N, /*accumulate=*/true);
    std::copy(b_next, b_next + MN, b);
  }

  // squarings: S_{k+1} = S_k S_k
  std::copy(dP, dP + NN, g);
  for (int64_t k = p.s - 1; k >= 0; --k) {
    const T* S = f.S.data() + k * NN;
    transpose(S, transposed, N, N);
    matmul(g, transposed, g_next, N, N, N);
    add_matmul_tn(S, g, g_next, N, N, N);
    std::swap(g, g_next);
  }
  for (int64_t q = 0; q < NN; ++q) gA[q] += g[q];
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

// Every feature is computed in float64, whatever the inputs' dtype: P = dA^c by squaring and its adjoint
// multiply rounding errors by the powers' growth, which float32 would carry into K and the gradients at
// several times the error of L plain float32 mat-vecs. Per feature the data are a few N x N matrices in
// cache, so this costs half the SIMD width, not memory traffic.
at::Tensor forward_cpu(const at::Tensor& dA_in, const at::Tensor& dB_in, const at::Tensor& C_in, int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble).contiguous(),
             C = C_in.to(at::kDouble).contiguous();
  auto K = at::empty({p.H, p.M, L}, dA.options());
  const double *a = dA.const_data_ptr<double>(), *b = dB.const_data_ptr<double>(), *c = C.const_data_ptr<double>();
  double* k = K.mutable_data_ptr<double>();
  at::parallel_for(0, p.H, 1, [&](int64_t h0, int64_t h1) {
    Feature<double> f;
    std::vector<double> prod;
    for (int64_t h = h0; h < h1; ++h)
      forward_feature(p, a + h * p.N * p.N, b + h * p.N, c + h * p.M * p.N, f, prod, k + h * p.M * L);
  });
  return K.to(dA_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& dA_in,
                                                            const at::Tensor& dB_in, const at::Tensor& C_in,
                                                            int64_t L) {
  const Plan p = check(dA_in, dB_in, C_in, L, "krylov_kernel_backward");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.H && grad.size(1) == p.M && grad.size(2) == L &&
                  grad.scalar_type() == dA_in.scalar_type(),
              "krylov_kernel_backward: grad must have shape (H, M, L) and dA's dtype");
  const auto dA = dA_in.to(at::kDouble).contiguous(), dB = dB_in.to(at::kDouble).contiguous(),
             C = C_in.to(at::kDouble).contiguous(), G = grad.to(at::kDouble).contiguous();
  auto gA = at::empty_like(dA), gB = at::empty_like(dB), gC = at::empty_like(C);
  const double *a = dA.const_data_ptr<double>(), *b = dB.const_data_ptr<double>(), *c = C.const_data_ptr<double>(),
               *g = G.const_data_ptr<double>();
  double *ga = gA.mutable_data_ptr<double>(), *gb = gB.mutable_data_ptr<double>(), *gc = gC.mutable_data_ptr<double>();
  at::parallel_for(0, p.H, 1, [&](int64_t h0, int64_t h1) {
    Feature<double> f;
    std::vector<double> scratch;
    const int64_t NN = p.N * p.N, MN = p.M * p.N;
    for (int64_t h = h0; h < h1; ++h)
      backward_feature(p, g + h * p.M * L, a + h * NN, b + h * p.N, c + h * MN, f, scratch, ga + h * NN, gb + h * p.N,
                       gc + h * MN);
  });
  const auto dtype = dA_in.scalar_type();
  return {gA.to(dtype), gB.to(dtype), gC.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("krylov_kernel", &forward_cpu);
  m.impl("krylov_kernel_backward", &backward_cpu);
}

}  // namespace accel
