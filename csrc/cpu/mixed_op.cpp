// DARTS mixed op on the CPU: out = sum_k w_k y_k and its backward, one pass over memory each.
//
// Forward reads every active y_k once and writes out once. Backward reads g and every active y_k once,
// writes dy_k = w_k g and accumulates <g, y_k> in the same pass. A weight that is exactly zero switches
// its branch off: its y_k is never read, dy_k = 0 and its weight gradient is 0.
//
// The reduction is two-stage with a fixed chunking (kReduceChunk elements, whatever the thread count):
// each chunk is summed in a fixed order (16 float lanes per kBlock block, blocks added in double), then
// the chunks in order, so results are bitwise reproducible run to run and across thread counts.
// Outputs of large calls are written with streaming stores (simd.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kBlock = 1024;         // elements per inner block, staged in L1 before it is stored
constexpr int64_t kReduceChunk = 32768;  // fixed reduction chunk (a multiple of kBlock); g's chunk stays in L2

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// out[0:n] = sum_k w[k] * ys[k][0:n] over the K active branches given (n <= kBlock). The sums for kVec
// consecutive elements stay in registers across the branch loop; out is written once.
template <typename T>
inline void forward_block(const T* const* ys, const double* w, int64_t K, int64_t n, T* out, bool stream) {
  using A = acc_t<T>;
  constexpr int kVec = 16;
  T result[kBlock];
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    A s[kVec] = {};
    for (int64_t k = 0; k < K; ++k) {
      const A wk = static_cast<A>(w[k]);
      const T* __restrict y = ys[k] + j;
      for (int l = 0; l < kVec; ++l) s[l] += wk * static_cast<A>(y[l]);
    }
    for (int l = 0; l < kVec; ++l) result[j + l] = static_cast<T>(s[l]);
  }
  for (; j < n; ++j) {
    A s = 0;
    for (int64_t k = 0; k < K; ++k) s += static_cast<A>(w[k]) * static_cast<A>(ys[k][j]);
    result[j] = static_cast<T>(s);
  }
  store_span(out, result, n * sizeof(T), stream);
}

// dy[0:n] = w * g[0:n]; returns <g[0:n], y[0:n]> (n <= kBlock). The dot product runs in kVec
// independent accumulators (vector registers) of the accumulation type over the block, and the block's
// sum is returned in double: at most kBlock / kVec terms are ever added in float.
template <typename T>
inline double backward_block(const T* __restrict g, const T* __restrict y, double w, int64_t n, T* dy,
                             bool stream) {
  using A = acc_t<T>;
  constexpr int kVec = 16;
  const A wa = static_cast<A>(w);
  T scaled[kBlock];
  A lanes[kVec] = {};
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    for (int l = 0; l < kVec; ++l) {
      const A gl = static_cast<A>(g[j + l]);
      scaled[j + l] = static_cast<T>(wa * gl);
      lanes[l] += gl * static_cast<A>(y[j + l]);
    }
  }
  double dot = 0.0;
  for (; j < n; ++j) {
    scaled[j] = static_cast<T>(wa * static_cast<A>(g[j]));
    dot += static_cast<double>(g[j]) * static_cast<double>(y[j]);
  }
  for (int l = 0; l < kVec; ++l) dot += lanes[l];
  store_span(dy, scaled, n * sizeof(T), stream);
  return dot;
}

template <typename T>
ACCEL_CPU_CLONES void forward_range(const T* const* ys, const double* w, int64_t K, int64_t begin,
                                    int64_t end, T* out, bool stream) {
  std::vector<const T*> ptrs(K);
  for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
    const int64_t n = std::min(kBlock, end - n0);
    for (int64_t k = 0; k < K; ++k) ptrs[k] = ys[k] + n0;
    forward_block(ptrs.data(), w, K, n, out + n0, stream);
  }
  if (stream) stream_fence();
}

// One reduction chunk [begin, end): writes dy for every branch and partial[k] = <g, y_k> on the chunk.
// Branch-major order: three streams at a time (g from L2, y_k, dy_k) rather than 2K + 1.
template <typename T>
ACCEL_CPU_CLONES void backward_range(const T* g, const T* const* ys, const double* w, int64_t K,
                                     int64_t begin, int64_t end, T* const* dy, double* partial, bool stream) {
  for (int64_t k = 0; k < K; ++k) {
    T* dyk = dy[k];
    if (w[k] == 0.0) {
      std::fill(dyk + begin, dyk + end, T(0));
      partial[k] = 0.0;
      continue;
    }
    double dot = 0.0;
    for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const int64_t n = std::min(kBlock, end - n0);
      dot += backward_block(g + n0, ys[k] + n0, w[k], n, dyk + n0, stream);
    }
    partial[k] = dot;
  }
  if (stream) stream_fence();
}

// Mixing weights in double: softmax(weights / tau) when tau is given, else the weights themselves.
std::vector<double> mixing_weights(const at::Tensor& weights, std::optional<double> tau) {
  auto wd = weights.to(at::kDouble).contiguous();
  const double* p = wd.data_ptr<double>();
  const int64_t K = wd.numel();
  std::vector<double> w(p, p + K);
  if (!tau.has_value()) return w;
  double mx = -std::numeric_limits<double>::infinity();
  for (double a : w) mx = std::max(mx, a / *tau);
  double sum = 0.0;
  for (auto& a : w) {
    a = std::exp(a / *tau - mx);
    sum += a;
  }
  for (auto& a : w) a /= sum;
  return w;
}

void check_inputs(at::TensorList ys, const at::Tensor& weights, std::optional<double> tau) {
  TORCH_CHECK(!ys.empty(), "mixed_op: ys must hold at least one tensor");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(ys.size()),
              "mixed_op: weights must have shape (K,) with K = len(ys) = ", ys.size(), ", got ",
              weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "mixed_op: weights must be floating point, got ",
              weights.scalar_type());
  TORCH_CHECK(weights.device().is_cpu(), "mixed_op: weights must be on the CPU like ys, got ", weights.device());
  TORCH_CHECK(!tau.has_value() || (std::isfinite(*tau) && *tau > 0), "mixed_op: tau must be finite and > 0, got ",
              tau.value_or(0.0));
  const auto& y0 = ys[0];
  const auto dt = y0.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "mixed_op: ys must be float32, float64 or bfloat16, got ", dt);
  for (size_t k = 0; k < ys.size(); ++k) {
    TORCH_CHECK(ys[k].device().is_cpu(), "mixed_op: ys[", k, "] must be on the CPU, got ", ys[k].device());
    TORCH_CHECK(ys[k].scalar_type() == dt, "mixed_op: ys[", k, "] has dtype ", ys[k].scalar_type(),
                " but ys[0] has ", dt);
    TORCH_CHECK(ys[k].sizes() == y0.sizes(), "mixed_op: ys[", k, "] has shape ", ys[k].sizes(),
                " but ys[0] has ", y0.sizes());
  }
}

// The kernels walk raw memory, so every operand must share one dense layout: the one torch.empty_like(ys[0])
// gets (that of ys[0] when it is dense, NCHW and channels-last alike). Only operands in another layout are
// copied (an expanded upstream gradient, say), never the others.
std::vector<int64_t> kernel_strides(const at::Tensor& y0) {
  return at::empty_like(y0, y0.options().device(at::kMeta)).strides().vec();
}

at::Tensor in_layout(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides && t.is_non_overlapping_and_dense()) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

std::vector<at::Tensor> in_layout(at::TensorList ts, at::IntArrayRef strides) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(in_layout(t, strides));
  return out;
}

int64_t grain_blocks() { return std::max<int64_t>(1, (1 << 15) / kBlock); }

at::Tensor mixed_op_cpu(at::TensorList ys_in, const at::Tensor& weights, std::optional<double> tau) {
  check_inputs(ys_in, weights, tau);
  const auto layout = kernel_strides(ys_in[0]);
  const auto ys = in_layout(ys_in, layout);
  const int64_t K = ys.size(), numel = ys[0].numel();
  const auto w = mixing_weights(weights, tau);
  auto out = at::empty_strided(ys[0].sizes(), layout, ys[0].options());
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, ys[0].scalar_type(), "mixed_op_cpu", [&] {
    // Only the active branches reach the kernel: a switched-off branch is never read.
    std::vector<const scalar_t*> active_ys;
    std::vector<double> active_w;
    for (int64_t k = 0; k < K; ++k) {
      if (w[k] == 0.0) continue;
      active_ys.push_back(ys[k].const_data_ptr<scalar_t>());
      active_w.push_back(w[k]);
    }
    const int64_t active = active_ys.size();
    if (active == 0) {
      out.zero_();
      return;
    }
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t nblocks = (numel + kBlock - 1) / kBlock;
    const bool stream = (active + 1) * numel * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingStoreBytes;
    at::parallel_for(0, nblocks, grain_blocks(), [&](int64_t b0, int64_t b1) {
      forward_range<scalar_t>(active_ys.data(), active_w.data(), active, b0 * kBlock, std::min(numel, b1 * kBlock),
                              o, stream);
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(const at::Tensor& grad, at::TensorList ys_in,
                                                         const at::Tensor& weights, std::optional<double> tau) {
  check_inputs(ys_in, weights, tau);
  TORCH_CHECK(grad.sizes() == ys_in[0].sizes() && grad.scalar_type() == ys_in[0].scalar_type() &&
                  grad.device().is_cpu(),
              "mixed_op_backward: grad must match ys[0] in shape, dtype and device");
  const auto layout = kernel_strides(ys_in[0]);
  const auto ys = in_layout(ys_in, layout);
  const at::Tensor g = in_layout(grad, layout);
  const int64_t K = ys.size(), numel = g.numel();
  const auto w = mixing_weights(weights, tau);

  // One tensor per branch rather than one (K, ...) buffer: equal-sized blocks are recycled by the CPU
  // allocator, while one large block tends to be freshly mapped (and page-faulted) on every call.
  std::vector<at::Tensor> grad_ys;
  for (int64_t k = 0; k < K; ++k) grad_ys.push_back(at::empty_strided(g.sizes(), layout, g.options()));

  const int64_t nchunks = (numel + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(nchunks * K, 0.0);
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "mixed_op_backward_cpu", [&] {
      std::vector<const scalar_t*> ptrs(K);
      for (int64_t k = 0; k < K; ++k) ptrs[k] = ys[k].const_data_ptr<scalar_t>();
      std::vector<scalar_t*> dy(K);
      for (int64_t k = 0; k < K; ++k) dy[k] = grad_ys[k].mutable_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const bool stream = (2 * K + 1) * numel * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingStoreBytes;
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          backward_range<scalar_t>(gp, ptrs.data(), w.data(), K, c * kReduceChunk,
                                   std::min(numel, (c + 1) * kReduceChunk), dy.data(), partial.data() + c * K,
                                   stream);
      });
    });
  }
  // Second stage, in chunk order: d w_k = <g, y_k>.
  std::vector<double> dw(K, 0.0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t k = 0; k < K; ++k) dw[k] += partial[c * K + k];
  // Through the softmax: d alpha_j = (1/tau) p_j (dw_j - sum_i p_i dw_i) = (1/tau) p_j <g, y_j - out>.
  if (tau.has_value()) {
    double mean = 0.0;
    for (int64_t k = 0; k < K; ++k) mean += w[k] * dw[k];
    for (int64_t k = 0; k < K; ++k) dw[k] = w[k] * (dw[k] - mean) / *tau;
  }
  auto grad_weights = at::empty({K}, weights.options().dtype(at::kDouble));
  std::copy(dw.begin(), dw.end(), grad_weights.mutable_data_ptr<double>());
  return {grad_ys, grad_weights.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("mixed_op", &mixed_op_cpu);
  m.impl("mixed_op_backward", &mixed_op_backward_cpu);
}

}  // namespace accel
