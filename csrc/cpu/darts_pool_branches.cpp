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

// max as torch's max pooling takes it: NaN wins.
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Scratch rows for one plane: horizontal 3-wide maxima and sums of every row, with one padding row above
// and below (-inf and 0), and the window sizes of count_include_pad=False averaging per row and column
// (the average divides by their product, exactly as PyTorch does).
struct PoolScratch {
  std::vector<float> padded, hmax, hsum, rows, cols, mx, av;
  int64_t H = -1, W = -1;
  // Sizes the buffers for H x W planes; every pass overwrites all but the padding rows, which stay as set.
  void size(int64_t H_, int64_t W_) {
    if (H_ == H && W_ == W) return;
    H = H_, W = W_;
    padded.resize(W + 2);
    mx.resize(H * W);
    av.resize(H * W);
    hmax.assign((H + 2) * W, -std::numeric_limits<float>::infinity());
    hsum.assign((H + 2) * W, 0.f);
    rows.resize(H);
    cols.resize(W);
    for (int64_t i = 0; i < H; ++i) rows[i] = static_cast<float>(1 + (i > 0) + (i + 1 < H));
    for (int64_t j = 0; j < W; ++j) cols[j] = static_cast<float>(1 + (j > 0) + (j + 1 < W));
  }
};

// 3x3 box sums (zero padding) of an H x W plane into out, separably; scratch.hsum is overwritten.
inline void box_sum(const float* in, int64_t H, int64_t W, PoolScratch& s, float* out) {
  float* pad = s.padded.data();
  pad[0] = pad[W + 1] = 0.f;
  for (int64_t r = 0; r < H; ++r) {
    std::copy(in + r * W, in + (r + 1) * W, pad + 1);
    float* hs = s.hsum.data() + (r + 1) * W;
    for (int64_t j = 0; j < W; ++j) hs[j] = pad[j] + pad[j + 1] + pad[j + 2];
  }
  for (int64_t i = 0; i < H; ++i) {
    const float *a = s.hsum.data() + i * W, *b = a + W, *c = b + W;
    float* o = out + i * W;
    for (int64_t j = 0; j < W; ++j) o[j] = a[j] + b[j] + c[j];
  }
}

// The 3x3, stride 1, padding 1 max and average (count_include_pad=False) pools of one H x W plane, separably:
// a horizontal pass over each row, then a vertical one, both over contiguous rows that vectorise.
template <typename T>
inline void pool_plane(const T* x, int64_t H, int64_t W, PoolScratch& s, float* __restrict mx, float* __restrict av) {
  float* pad = s.padded.data();
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t j = 0; j < W; ++j) pad[j + 1] = static_cast<float>(x[r * W + j]);
    float* hm = s.hmax.data() + (r + 1) * W;
    float* hs = s.hsum.data() + (r + 1) * W;
    pad[0] = pad[W + 1] = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < W; ++j) hm[j] = nan_max(nan_max(pad[j], pad[j + 1]), pad[j + 2]);
    pad[0] = pad[W + 1] = 0.f;
    for (int64_t j = 0; j < W; ++j) hs[j] = pad[j] + pad[j + 1] + pad[j + 2];
  }
  for (int64_t i = 0; i < H; ++i) {
    const float* __restrict ma = s.hmax.data() + i * W;
    const float* __restrict sa = s.hsum.data() + i * W;
    const float* __restrict cols = s.cols.data();
    float* __restrict mxi = mx + i * W;
    float* __restrict avi = av + i * W;
    const float rows = s.rows[i];
    for (int64_t j = 0; j < W; ++j) {
      mxi[j] = nan_max(nan_max(ma[j], ma[j + W]), ma[j + 2 * W]);
      avi[j] = (sa[j] + sa[j + W] + sa[j + 2 * W]) / (rows * cols[j]);
    }
  }
}

// Training pass 1 of one plane: acc += [sum mx, sum mx^2, sum av, sum av^2] of its pooled values.
ACCEL_CPU_CLONES void pooled_moments_plane(const float* x, int64_t H, int64_t W, PoolScratch& s, double* acc) {
  pool_plane(x, H, W, s, s.mx.data(), s.av.data());
  // Double lanes: the variance is E[x^2] - mean^2, which cancels where a channel's mean is large next to its
  // spread; in float lanes the squares' rounding alone then outweighed the variance.
  double sum[4][16] = {};
  int64_t k = 0;
  for (; k + 16 <= H * W; k += 16)
    for (int l = 0; l < 16; ++l) {
      const double m = s.mx[k + l], a = s.av[k + l];
      sum[0][l] += m, sum[1][l] += m * m, sum[2][l] += a, sum[3][l] += a * a;
    }
  for (; k < H * W; ++k) {
    const double m = s.mx[k], a = s.av[k];
    acc[0] += m, acc[1] += m * m, acc[2] += a, acc[3] += a * a;
  }
  for (int q = 0; q < 4; ++q)
    for (int l = 0; l < 16; ++l) acc[q] += sum[q][l];
}

// out = a * (maxpool(x) - mean_max) + b * (avgpool(x) - mean_avg) over one plane: centred first, since
// a * mx + b * av + d cancels where the means are large next to the spread.
ACCEL_CPU_CLONES void mix_plane(const float* x, int64_t H, int64_t W, float a, float b, float mean_max,
                                float mean_avg, PoolScratch& s, float* out) {
  pool_plane(x, H, W, s, s.mx.data(), s.av.data());
  for (int64_t k = 0; k < H * W; ++k) out[k] = a * (s.mx[k] - mean_max) + b * (s.av[k] - mean_avg);
}

// Backward pass 1 of one plane: acc += [sum g, sum g * xhat_max, sum g * xhat_avg].
ACCEL_CPU_CLONES void gradient_moments_plane(const float* x, const float* g, int64_t H, int64_t W, const float* mean,
                                             const float* invstd, PoolScratch& s, double* acc) {
  pool_plane(x, H, W, s, s.mx.data(), s.av.data());
  float sum[3][16] = {};
  int64_t k = 0;
  for (; k + 16 <= H * W; k += 16)
    for (int l = 0; l < 16; ++l) {
      const float gl = g[k + l];
      sum[0][l] += gl;
      sum[1][l] += gl * ((s.mx[k + l] - mean[0]) * invstd[0]);
      sum[2][l] += gl * ((s.av[k + l] - mean[1]) * invstd[1]);
    }
  for (; k < H * W; ++k) {
    acc[0] += g[k];
    acc[1] += static_cast<double>(g[k]) * ((s.mx[k] - mean[0]) * invstd[0]);
    acc[2] += static_cast<double>(g[k]) * ((s.av[k] - mean[1]) * invstd[1]);
  }
  for (int q = 0; q < 3; ++q)
    for (int l = 0; l < 16; ++l) acc[q] += sum[q][l];
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
      thread_local PoolScratch scratch;
      scratch.size(s.H, s.W);
      pooled_moments_plane(xp + p * hw, s.H, s.W, scratch, acc);
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
    PoolScratch scratch;
    scratch.size(s.H, s.W);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C;
      // w0 * (mx - mean0) * r0 + w1 * (av - mean1) * r1
      const float a = w0 * st[s.C + c], b = w1 * st[3 * s.C + c];
      mix_plane(xp + p * hw, s.H, s.W, a, b, st[c], st[2 * s.C + c], scratch, op + p * hw);
    }
  });
  return {out, stats, new_running};
}

// What pass 2 needs of one plane's channel: per branch b, dp_b = coef_b (g - mean_g - xhat_b mean_gx_b).
struct PlaneGradient {
  float mean_g, coef[kBranches], mean_gx[kBranches], mean[kBranches], invstd[kBranches];
};

struct BackwardScratch {
  PoolScratch pool;
  std::vector<float> mx, av, dmax, q, padded_x, arg;
  explicit BackwardScratch(const Shape& s)
      : mx(s.plane()), av(s.plane()), dmax(s.plane()), q(s.plane()),
        padded_x((s.H + 2) * (s.W + 2), -std::numeric_limits<float>::infinity()), arg(s.plane()) {
    pool.size(s.H, s.W);
  }
};

// dx of one plane: the avg branch's gradient spread by a 3x3 box sum, the max branch's routed to the first
// maximum of each window in PyTorch's scan order (window offsets tried last to first over the -inf padded
// plane, so the first match is kept; offsets are kept as floats so the selection vectorises).
ACCEL_CPU_CLONES void backward_dx_plane(const Shape& s, const float* x, const float* g, const PlaneGradient& pg,
                                        BackwardScratch& b, float* dx) {
  const int64_t H = s.H, W = s.W;
  pool_plane(x, H, W, b.pool, b.mx.data(), b.av.data());
  for (int64_t i = 0; i < H; ++i) {
    const float rows = b.pool.rows[i];
    for (int64_t j = 0; j < W; ++j) {
      const int64_t k = i * W + j;
      b.dmax[k] = pg.coef[0] * (g[k] - pg.mean_g - (b.mx[k] - pg.mean[0]) * pg.invstd[0] * pg.mean_gx[0]);
      b.q[k] = pg.coef[1] * (g[k] - pg.mean_g - (b.av[k] - pg.mean[1]) * pg.invstd[1] * pg.mean_gx[1]) /
               (rows * b.pool.cols[j]);
    }
  }
  box_sum(b.q.data(), H, W, b.pool, dx);
  float* xpad = b.padded_x.data();
  for (int64_t r = 0; r < H; ++r) std::copy(x + r * W, x + (r + 1) * W, xpad + (r + 1) * (W + 2) + 1);
  for (int64_t off = 8; off >= 0; --off) {
    const int64_t dr = off / 3, dc = off % 3;
    const float code = static_cast<float>(off);
    for (int64_t i = 0; i < H; ++i) {
      const float* v = xpad + (i + dr) * (W + 2) + dc;
      const float* m = b.mx.data() + i * W;
      float* a = b.arg.data() + i * W;
      for (int64_t j = 0; j < W; ++j) a[j] = (v[j] == m[j] || (v[j] != v[j] && m[j] != m[j])) ? code : a[j];
    }
  }
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) {
      const int64_t k = i * W + j, off = static_cast<int64_t>(b.arg[k]);
      dx[(i + off / 3 - 1) * W + j + off % 3 - 1] += b.dmax[k];
    }
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
    thread_local PoolScratch scratch;
    scratch.size(s.H, s.W);
    const float mean[kBranches] = {st[c], st[2 * s.C + c]}, invstd[kBranches] = {st[s.C + c], st[3 * s.C + c]};
    gradient_moments_plane(xp + p * hw, gp + p * hw, s.H, s.W, mean, invstd, scratch, acc);
  });
  double dw[kBranches] = {0.0, 0.0};
  for (int64_t c = 0; c < s.C; ++c) dw[0] += sums[c * 3 + 1], dw[1] += sums[c * 3 + 2];

  // Pass 2: dp_b = w_b r_b (g - mean(g) - xhat_b mean(g xhat_b)) in training (w_b r_b g in eval), then
  // through the pools into dx.
  auto gx = at::empty_like(x);
  float* gxp = gx.mutable_data_ptr<float>();
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    BackwardScratch scratch(s);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % s.C;
      PlaneGradient pg;
      pg.mean_g = training ? static_cast<float>(sums[c * 3] / count) : 0.f;
      for (int b = 0; b < kBranches; ++b) {
        pg.coef[b] = w[b] * st[(2 * b + 1) * s.C + c];
        pg.mean_gx[b] = training ? static_cast<float>(sums[c * 3 + 1 + b] / count) : 0.f;
        pg.mean[b] = st[2 * b * s.C + c];
        pg.invstd[b] = st[(2 * b + 1) * s.C + c];
      }
      backward_dx_plane(s, xp + p * hw, gp + p * hw, pg, scratch, gxp + p * hw);
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
