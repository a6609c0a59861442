// DARTS' two pooling branches of a stride-1 edge, fused: out = w0 * BN(maxpool3x3(x)) + w1 * BN(avgpool3x3(x)),
// BatchNorm without affine parameters, average pooling with count_include_pad=False (DARTS' search ops).
//
// Eager PyTorch materialises both pooled tensors, the max-pool indices and both BN outputs, and keeps them
// for backward. Here nothing but x and 2 x C statistics is kept: every pass recomputes the 3x3 pools of a
// plane (N*C planes, each in L1) from x.
//   forward, training: pass 1 sums the pooled values per channel (mean, biased variance), pass 2 writes out
//   forward, eval:     the running statistics, one pass
//   backward:          pass 1 sums g and g * xhat per channel, pass 2 scatters the BN gradient through the
//                      pools into dx (max: to the first maximum of each window, as PyTorch; avg: 1/count)
// Per-plane partial sums are added over the batch in a fixed order: bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int kBranches = 2;  // 0: max pool, 1: avg pool

// The 3x3, stride 1, padding 1 max and average (count_include_pad=False) pools of one H x W plane.
template <typename T>
void pool_plane(const T* x, int64_t H, int64_t W, float* mx, float* av) {
  for (int64_t i = 0; i < H; ++i) {
    const int64_t r0 = std::max<int64_t>(i - 1, 0), r1 = std::min<int64_t>(i + 1, H - 1);
    for (int64_t j = 0; j < W; ++j) {
      const int64_t c0 = std::max<int64_t>(j - 1, 0), c1 = std::min<int64_t>(j + 1, W - 1);
      float m = -std::numeric_limits<float>::infinity(), s = 0.f;
      for (int64_t r = r0; r <= r1; ++r)
        for (int64_t c = c0; c <= c1; ++c) {
          const float v = static_cast<float>(x[r * W + c]);
          if (v > m || std::isnan(v)) m = v;
          s += v;
        }
      mx[i * W + j] = m;
      av[i * W + j] = s / static_cast<float>((r1 - r0 + 1) * (c1 - c0 + 1));
    }
  }
}

struct Shape {
  int64_t N, C, H, W;
  int64_t plane() const { return H * W; }
};

Shape check(const at::Tensor& x, const at::Tensor& weights) {
  TORCH_CHECK(x.dim() == 4, "darts_pool_branches: x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "darts_pool_branches: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == kBranches && weights.is_floating_point(),
              "darts_pool_branches: weights must be a floating tensor of shape (2,), got ", weights.sizes());
  TORCH_CHECK(x.device().is_cpu() && weights.device().is_cpu(), "darts_pool_branches: tensors must be on the CPU");
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

// Per-channel sums over (N, H, W) of f(n, c) applied plane by plane, added over n in order.
template <typename PlaneFn>
std::vector<double> channel_sums(const Shape& s, int64_t per_plane, PlaneFn fn) {
  std::vector<double> partial(s.N * s.C * per_plane, 0.0);
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p, partial.data() + p * per_plane);
  });
  std::vector<double> sums(s.C * per_plane, 0.0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t k = 0; k < per_plane; ++k) sums[c * per_plane + k] += partial[(n * s.C + c) * per_plane + k];
  return sums;
}

// running: (4, C) running mean and variance of the max branch, then of the avg branch. Returns out, the
// statistics used, stats (4, C): mean and 1/sqrt(var + eps) of each branch, and the updated running
// statistics (the op is functional: the caller stores them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, const at::Tensor& weights,
                                                           const at::Tensor& running_in, bool training,
                                                           double momentum, double eps) {
  const Shape s = check(x_in, weights);
  const auto x = x_in.contiguous();
  const int64_t hw = s.plane(), count = s.N * hw;
  TORCH_CHECK(!training || count > 1, "darts_pool_branches: training needs more than one value per channel");
  TORCH_CHECK(running_in.dim() == 2 && running_in.size(0) == 2 * kBranches && running_in.size(1) == s.C &&
                  running_in.scalar_type() == at::kFloat,
              "darts_pool_branches: running must be float32 of shape (4, C) = (4, ", s.C, "), got ", running_in.sizes());
  const auto running = running_in.contiguous();
  auto new_running = running.clone();
  const float* xp = x.const_data_ptr<float>();
  auto stats = at::empty({2 * kBranches, s.C}, x.options());
  float* st = stats.mutable_data_ptr<float>();
  if (training) {
    // sums per channel: [max sum, max sum of squares, avg sum, avg sum of squares]
    const auto sums = channel_sums(s, 4, [&](int64_t p, double* acc) {
      std::vector<float> mx(hw), av(hw);
      pool_plane(xp + p * hw, s.H, s.W, mx.data(), av.data());
      for (int64_t k = 0; k < hw; ++k) {
        acc[0] += mx[k], acc[1] += static_cast<double>(mx[k]) * mx[k];
        acc[2] += av[k], acc[3] += static_cast<double>(av[k]) * av[k];
      }
    });
    for (int b = 0; b < kBranches; ++b) {
      float* rm = new_running.mutable_data_ptr<float>() + (2 * b) * s.C;
      float* rv = new_running.mutable_data_ptr<float>() + (2 * b + 1) * s.C;
      for (int64_t c = 0; c < s.C; ++c) {
        const double mean = sums[c * 4 + 2 * b] / count;
        const double var = std::max(sums[c * 4 + 2 * b + 1] / count - mean * mean, 0.0);
        st[(2 * b) * s.C + c] = static_cast<float>(mean);
        st[(2 * b + 1) * s.C + c] = static_cast<float>(1.0 / std::sqrt(var + eps));
        // As torch's BatchNorm2d: the running variance takes the unbiased estimate.
        rm[c] = static_cast<float>((1 - momentum) * rm[c] + momentum * mean);
        rv[c] = static_cast<float>((1 - momentum) * rv[c] + momentum * var * count / (count - 1));
      }
    }
  } else {
    for (int b = 0; b < kBranches; ++b) {
      const float* rm = running.const_data_ptr<float>() + (2 * b) * s.C;
      const float* rv = running.const_data_ptr<float>() + (2 * b + 1) * s.C;
      for (int64_t c = 0; c < s.C; ++c) {
        st[(2 * b) * s.C + c] = rm[c];
        st[(2 * b + 1) * s.C + c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
      }
    }
  }
  auto wd = weights.to(at::kFloat).contiguous();
  const float w0 = wd.const_data_ptr<float>()[0], w1 = wd.const_data_ptr<float>()[1];
  auto out = at::empty_like(x);
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> mx(hw), av(hw);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C;
      pool_plane(xp + p * hw, s.H, s.W, mx.data(), av.data());
      // w0 * (mx - mean0) * r0 + w1 * (av - mean1) * r1, as a * mx + b * av + d
      const float a = w0 * st[s.C + c], b = w1 * st[3 * s.C + c];
      const float d = -(a * st[c] + b * st[2 * s.C + c]);
      float* o = op + p * hw;
      for (int64_t k = 0; k < hw; ++k) o[k] = a * mx[k] + b * av[k] + d;
    }
  });
  return {out, stats, new_running};
}

// eps is in the schema for the reference fallback, which recomputes the batch statistics; here `stats`
// already holds 1/sqrt(var + eps).
std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                const at::Tensor& weights, const at::Tensor& stats, bool training,
                                                double /*eps*/) {
  const Shape s = check(x_in, weights);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == at::kFloat,
              "darts_pool_branches_backward: grad must match x");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 * kBranches && stats.size(1) == s.C,
              "darts_pool_branches_backward: stats must have shape (4, C)");
  const auto x = x_in.contiguous();
  const auto g = grad_in.contiguous();
  const auto st_t = stats.contiguous();
  const float* xp = x.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const float* st = st_t.const_data_ptr<float>();
  const int64_t hw = s.plane(), count = s.N * hw;
  auto wd = weights.to(at::kFloat).contiguous();
  const float w[kBranches] = {wd.const_data_ptr<float>()[0], wd.const_data_ptr<float>()[1]};

  // Pass 1: per channel, sum g and sum g * xhat_b (which is also d w_b summed over channels).
  const auto sums = channel_sums(s, 3, [&](int64_t p, double* acc) {
    const int64_t c = p % s.C;
    std::vector<float> mx(hw), av(hw);
    pool_plane(xp + p * hw, s.H, s.W, mx.data(), av.data());
    const float* gpl = gp + p * hw;
    for (int64_t k = 0; k < hw; ++k) {
      acc[0] += gpl[k];
      acc[1] += static_cast<double>(gpl[k]) * ((mx[k] - st[c]) * st[s.C + c]);
      acc[2] += static_cast<double>(gpl[k]) * ((av[k] - st[2 * s.C + c]) * st[3 * s.C + c]);
    }
  });
  double dw[kBranches] = {0.0, 0.0};
  for (int64_t c = 0; c < s.C; ++c) dw[0] += sums[c * 3 + 1], dw[1] += sums[c * 3 + 2];

  // Pass 2: dp_b = w_b r_b (g - mean(g) - xhat_b mean(g xhat_b)) in training (w_b r_b g in eval), then
  // through the pools into dx.
  auto gx = at::empty_like(x);
  float* gxp = gx.mutable_data_ptr<float>();
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> mx(hw), av(hw);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C;
      const float* xpl = xp + p * hw;
      const float* gpl = gp + p * hw;
      float* dx = gxp + p * hw;
      pool_plane(xpl, s.H, s.W, mx.data(), av.data());
      const float mean_g = training ? static_cast<float>(sums[c * 3] / count) : 0.f;
      float coef[kBranches], mean_gx[kBranches];
      for (int b = 0; b < kBranches; ++b) {
        coef[b] = w[b] * st[(2 * b + 1) * s.C + c];
        mean_gx[b] = training ? static_cast<float>(sums[c * 3 + 1 + b] / count) : 0.f;
      }
      std::fill(dx, dx + hw, 0.f);
      for (int64_t i = 0; i < s.H; ++i) {
        const int64_t r0 = std::max<int64_t>(i - 1, 0), r1 = std::min<int64_t>(i + 1, s.H - 1);
        for (int64_t j = 0; j < s.W; ++j) {
          const int64_t c0 = std::max<int64_t>(j - 1, 0), c1 = std::min<int64_t>(j + 1, s.W - 1);
          const int64_t k = i * s.W + j;
          const float xhat_m = (mx[k] - st[c]) * st[s.C + c];
          const float xhat_a = (av[k] - st[2 * s.C + c]) * st[3 * s.C + c];
          const float dmax = coef[0] * (gpl[k] - mean_g - xhat_m * mean_gx[0]);
          const float davg = coef[1] * (gpl[k] - mean_g - xhat_a * mean_gx[1]) /
                             static_cast<float>((r1 - r0 + 1) * (c1 - c0 + 1));
          int64_t arg = r0 * s.W + c0;
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t r = r0; r <= r1; ++r)
            for (int64_t cc = c0; cc <= c1; ++cc) {
              const float v = xpl[r * s.W + cc];
              if (v > m || std::isnan(v)) m = v, arg = r * s.W + cc;
              dx[r * s.W + cc] += davg;
            }
          dx[arg] += dmax;
        }
      }
    }
  });
  auto grad_weights = at::empty({kBranches}, weights.options().dtype(at::kDouble));
  grad_weights.mutable_data_ptr<double>()[0] = dw[0];
  grad_weights.mutable_data_ptr<double>()[1] = dw[1];
  return {gx, grad_weights.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("darts_pool_branches", &forward_cpu);
  m.impl("darts_pool_branches_backward", &backward_cpu);
}

}  // namespace accel
