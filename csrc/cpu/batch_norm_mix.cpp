// The weighted sum of K batch-normalised tensors, fused: out = sum_k w_k BN_k(z_k), BN without affine
// parameters. In a DARTS edge the z_k are the parametric branches' last convolutions, before their
// BatchNorm2d(affine=False).
//
// Eager PyTorch keeps each z_k (for the BN backward) and each BN output (for the w_k * y_k product); here
// only the z_k and K x 2 x C statistics are kept, and the backward recomputes xhat_k = (z_k - mean_k) r_k.
//   forward, training: pass 1 sums z and z^2 per channel (shifted by a per-channel value against
//                      cancellation), pass 2 writes out = sum_k w_k r_k (z_k - mean_k)
//   forward, eval:     the running statistics, one pass
//   backward:          pass 1 sums g and g * xhat_k per channel (the latter is also d w_k summed over
//                      channels), pass 2 writes dz_k = w_k r_k (g - mean(g) - xhat_k mean(g xhat_k))
// Per-plane partial sums are added over the batch in a fixed order: bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int kLanes = 16;  // independent accumulators per sum, so the loops vectorise

// acc += [sum (z - shift), sum (z - shift)^2] over one plane of n values.
template <typename T>
ACCEL_CPU_CLONES void moments_plane(const T* __restrict z, int64_t n, T shift, double* acc) {
  T s[kLanes] = {}, q[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T v = z[i + l] - shift;
      s[l] += v, q[l] += v * v;
    }
  for (; i < n; ++i) {
    const double v = static_cast<double>(z[i]) - shift;
    acc[0] += v, acc[1] += v * v;
  }
  for (int l = 0; l < kLanes; ++l) acc[0] += s[l], acc[1] += q[l];
}

// out = sum_k a[k] (z_k - m[k]) over one plane, accumulated in out (a plane stays in L1). Centring each
// value before scaling, rather than folding the means into one offset, keeps out accurate when a channel's
// mean is large next to its spread.
template <typename T>
ACCEL_CPU_CLONES void mix_plane(const T* const* zs, const T* a, const T* m, int64_t K, int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict z = zs[k];
    const T ak = a[k], mk = m[k];
    for (int64_t i = 0; i < n; ++i) out[i] += ak * (z[i] - mk);
  }
}

// acc[0] += sum g; acc[1 + k] += sum g * (z_k - mean_k) over one plane (r_k is applied per channel later).
template <typename T>
ACCEL_CPU_CLONES void gradient_moments_plane(const T* __restrict g, const T* const* zs, const T* mean, int64_t K,
                                             int64_t n, double* acc) {
  T s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += g[i + l];
  for (; i < n; ++i) acc[0] += g[i];
  for (int l = 0; l < kLanes; ++l) acc[0] += s[l];
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict z = zs[k];
    const T m = mean[k];
    T t[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) t[l] += g[j + l] * (z[j + l] - m);
    for (; j < n; ++j) acc[1 + k] += static_cast<double>(g[j]) * (static_cast<double>(z[j]) - m);
    for (int l = 0; l < kLanes; ++l) acc[1 + k] += t[l];
  }
}

// dz = coef (g - mean_g - (z - mean) r mean_gx) over one plane.
template <typename T>
ACCEL_CPU_CLONES void gradient_plane(const T* __restrict g, const T* __restrict z, T coef, T mean_g, T mean, T r,
                                     T mean_gx, int64_t n, T* __restrict dz) {
  const T slope = r * mean_gx;
  for (int64_t i = 0; i < n; ++i) dz[i] = coef * (g[i] - mean_g - (z[i] - mean) * slope);
}

struct Shape {
  int64_t K, N, C, plane;  // plane: the product of the sizes after C
  int64_t count() const { return N * plane; }
};

Shape check(const at::TensorList zs, const at::Tensor& weights, const char* name) {
  TORCH_CHECK(!zs.empty(), name, ": zs must hold at least one tensor");
  const auto& z0 = zs[0];
  TORCH_CHECK(z0.dim() >= 2, name, ": zs must have shape (N, C, ...), got ", z0.sizes());
  TORCH_CHECK(z0.scalar_type() == at::kFloat || z0.scalar_type() == at::kDouble, name,
              ": zs must be float32 or float64, got ", z0.scalar_type());
  for (const auto& z : zs)
    TORCH_CHECK(z.sizes() == z0.sizes() && z.scalar_type() == z0.scalar_type() && z.device().is_cpu(), name,
                ": every z must match zs[0]'s shape and dtype on the CPU");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(zs.size()), name,
              ": weights must have shape (K,)");
  return {static_cast<int64_t>(zs.size()), z0.size(0), z0.size(1), z0.numel() / std::max<int64_t>(1, z0.size(0) * z0.size(1))};
}

// Per-channel sums: fn(k, p, acc) adds the `width` sums of tensor k's plane p = n * C + c into acc; the
// plane partials are added over n in order. Returns sums[(k * C + c) * width + j].
template <typename PlaneFn>
std::vector<double> channel_sums(const Shape& s, int64_t tensors, int64_t width, PlaneFn fn) {
  const int64_t planes = s.N * s.C;
  std::vector<double> partial(tensors * planes * width, 0.0);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.plane));
  at::parallel_for(0, tensors * planes, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t / planes, t % planes, partial.data() + t * width);
  });
  std::vector<double> sums(tensors * s.C * width, 0.0);
  for (int64_t k = 0; k < tensors; ++k)
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t j = 0; j < width; ++j)
          sums[(k * s.C + c) * width + j] += partial[(k * planes + n * s.C + c) * width + j];
  return sums;
}

std::vector<at::Tensor> contiguous(const at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.const_data_ptr<T>());
  return out;
}

// running: (K, 2, C) running mean and variance per tensor. Returns out, stats (K, 2, C): the mean and
// 1/sqrt(var + eps) used, and the updated running statistics (functional: the caller stores them).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Shape& s, const std::vector<at::Tensor>& zs,
                                                            const at::Tensor& weights, const at::Tensor& running,
                                                            bool training, double momentum, double eps) {
  const auto zp = pointers<T>(zs);
  const int64_t count = s.count();
  auto new_running = running.to(at::kDouble).contiguous();  // updated in double, returned in running's dtype
  double* rn = new_running.mutable_data_ptr<double>();
  auto stats_d = at::empty({s.K, 2, s.C}, zs[0].options().dtype(at::kDouble));
  double* st = stats_d.mutable_data_ptr<double>();
  if (training) {
    // Shift each channel by one of its values: the variance then comes from sums of small numbers.
    std::vector<T> shift(s.K * s.C);
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t c = 0; c < s.C; ++c) shift[k * s.C + c] = s.plane ? zp[k][c * s.plane] : T(0);
    const auto sums = channel_sums(s, s.K, 2, [&](int64_t k, int64_t p, double* acc) {
      moments_plane(zp[k] + p * s.plane, s.plane, shift[k * s.C + p % s.C], acc);
    });
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t kc = k * s.C + c;
        const double centred = sums[kc * 2] / count;
        const double mean = shift[kc] + centred;
        const double var = std::max(sums[kc * 2 + 1] / count - centred * centred, 0.0);
        st[(2 * k) * s.C + c] = mean;
        st[(2 * k + 1) * s.C + c] = 1.0 / std::sqrt(var + eps);
        // As torch's BatchNorm2d: the running variance takes the unbiased estimate.
        rn[(2 * k) * s.C + c] = (1 - momentum) * rn[(2 * k) * s.C + c] + momentum * mean;
        rn[(2 * k + 1) * s.C + c] = (1 - momentum) * rn[(2 * k + 1) * s.C + c] + momentum * var * count / (count - 1);
      }
  } else {
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t c = 0; c < s.C; ++c) {
        st[(2 * k) * s.C + c] = rn[(2 * k) * s.C + c];
        st[(2 * k + 1) * s.C + c] = 1.0 / std::sqrt(rn[(2 * k + 1) * s.C + c] + eps);
      }
  }
  const auto wd = weights.to(at::kDouble).contiguous();
  const double* w = wd.const_data_ptr<double>();
  // Per channel: out = sum_k a_k (z_k - mean_k) with a_k = w_k r_k.
  std::vector<T> a(s.C * s.K), m(s.C * s.K);
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.K; ++k) {
      a[c * s.K + k] = static_cast<T>(w[k] * st[(2 * k + 1) * s.C + c]);
      m[c * s.K + k] = static_cast<T>(st[(2 * k) * s.C + c]);
    }
  auto out = at::empty_like(zs[0]);
  T* op = out.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.plane));
  at::parallel_for(0, s.N * s.C, grain, [&](int64_t p0, int64_t p1) {
    std::vector<const T*> planes(s.K);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C;
      for (int64_t k = 0; k < s.K; ++k) planes[k] = zp[k] + p * s.plane;
      mix_plane(planes.data(), a.data() + c * s.K, m.data() + c * s.K, s.K, s.plane, op + p * s.plane);
    }
  });
  return {out, stats_d.to(zs[0].scalar_type()), new_running.to(running.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(at::TensorList zs_in, const at::Tensor& weights,
                                                           const at::Tensor& running, bool training,
                                                           double momentum, double eps) {
  const Shape s = check(zs_in, weights, "batch_norm_mix");
  TORCH_CHECK(running.dim() == 3 && running.size(0) == s.K && running.size(1) == 2 && running.size(2) == s.C,
              "batch_norm_mix: running must have shape (K, 2, C) = (", s.K, ", 2, ", s.C, "), got ", running.sizes());
  TORCH_CHECK(!training || s.count() > 1, "batch_norm_mix: training needs more than one value per channel");
  const auto zs = contiguous(zs_in);
  if (zs[0].scalar_type() == at::kDouble) return forward_impl<double>(s, zs, weights, running, training, momentum, eps);
  return forward_impl<float>(s, zs, weights, running, training, momentum, eps);
}

template <typename T>
std::tuple<std::vector<at::Tensor>, at::Tensor> backward_impl(const Shape& s, const at::Tensor& g_t,
                                                              const std::vector<at::Tensor>& zs,
                                                              const at::Tensor& weights, const at::Tensor& stats_t,
                                                              bool training) {
  const auto zp = pointers<T>(zs);
  const T* g = g_t.const_data_ptr<T>();
  const auto st_t = stats_t.to(at::kDouble).contiguous();
  const double* st = st_t.const_data_ptr<double>();
  const auto wd = weights.to(at::kDouble).contiguous();
  const double* w = wd.const_data_ptr<double>();
  const int64_t count = s.count();
  // mean[c * K + k]: the statistics of channel c, gathered per channel for the plane loops.
  std::vector<T> mean(s.C * s.K), r(s.C * s.K);
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t c = 0; c < s.C; ++c) {
      mean[c * s.K + k] = static_cast<T>(st[(2 * k) * s.C + c]);
      r[c * s.K + k] = static_cast<T>(st[(2 * k + 1) * s.C + c]);
    }

  // Pass 1: per channel, sum g and sum g (z_k - mean_k); times r_k the latter is sum g xhat_k.
  const int64_t width = 1 + s.K;
  const auto sums = channel_sums(s, 1, width, [&](int64_t, int64_t p, double* acc) {
    const int64_t c = p % s.C;
    std::vector<const T*> planes(s.K);
    for (int64_t k = 0; k < s.K; ++k) planes[k] = zp[k] + p * s.plane;
    gradient_moments_plane(g + p * s.plane, planes.data(), mean.data() + c * s.K, s.K, s.plane, acc);
  });
  auto grad_weights = at::zeros({s.K}, weights.options().dtype(at::kDouble));
  double* dw = grad_weights.mutable_data_ptr<double>();
  std::vector<T> mean_g(s.C), mean_gx(s.C * s.K);
  for (int64_t c = 0; c < s.C; ++c) {
    mean_g[c] = training ? static_cast<T>(sums[c * width] / count) : T(0);
    for (int64_t k = 0; k < s.K; ++k) {
      const double gx = sums[c * width + 1 + k] * st[(2 * k + 1) * s.C + c];
      dw[k] += gx;
      mean_gx[c * s.K + k] = training ? static_cast<T>(gx / count) : T(0);
    }
  }

  // Pass 2: dz_k = w_k r_k (g - mean(g) - xhat_k mean(g xhat_k)) in training, w_k r_k g in eval.
  std::vector<at::Tensor> grads;
  std::vector<T*> dzp;
  for (const auto& z : zs) {
    grads.push_back(at::empty_like(z));
    dzp.push_back(grads.back().mutable_data_ptr<T>());
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.plane));
  at::parallel_for(0, s.N * s.C, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C, off = p * s.plane;
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t ck = c * s.K + k;
        gradient_plane(g + off, zp[k] + off, static_cast<T>(w[k]) * r[ck], mean_g[c], mean[ck], r[ck], mean_gx[ck],
                       s.plane, dzp[k] + off);
      }
    }
  });
  return {grads, grad_weights.to(weights.scalar_type())};
}

// eps is in the schema for the reference fallback, which recomputes the batch statistics; here `stats`
// already holds 1/sqrt(var + eps).
std::tuple<std::vector<at::Tensor>, at::Tensor> backward_cpu(const at::Tensor& grad, at::TensorList zs_in,
                                                             const at::Tensor& weights, const at::Tensor& stats,
                                                             bool training, double /*eps*/) {
  const Shape s = check(zs_in, weights, "batch_norm_mix_backward");
  TORCH_CHECK(grad.sizes() == zs_in[0].sizes() && grad.scalar_type() == zs_in[0].scalar_type(),
              "batch_norm_mix_backward: grad must match zs[0]");
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == s.K && stats.size(1) == 2 && stats.size(2) == s.C,
              "batch_norm_mix_backward: stats must have shape (K, 2, C)");
  const auto zs = contiguous(zs_in);
  const auto g = grad.contiguous();
  if (zs[0].scalar_type() == at::kDouble) return backward_impl<double>(s, g, zs, weights, stats, training);
  return backward_impl<float>(s, g, zs, weights, stats, training);
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("batch_norm_mix", &forward_cpu);
  m.impl("batch_norm_mix_backward", &backward_cpu);
}

}  // namespace accel
