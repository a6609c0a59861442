// Depthwise 2-D convolution on the CPU (DARTS' separable and dilated convolutions), forward and backward.
//
// The forward is ATen's (oneDNN's depthwise kernel is fast); PyTorch's CPU backward for this convolution is
// 10-50x slower than its forward, and that is what this file replaces. Work is split over the N*C
// independent planes. At stride 1 (DARTS' sep and dil convs but the first conv of a reduction edge) each
// plane is copied once into a zero-padded buffer in L1/L2, and each gradient is then a pass over it with no
// bounds checks, kTile output columns held in registers across all kernel taps:
//   grad input   gx  = g_padded (*) flip(w)           (the transposed convolution at stride 1)
//   grad weight  gw[a,b] = <g, x_padded shifted by (a*d, b*d)>
// At stride s > 1 (the first conv of a reduction edge's sep and dil convs) the plane's gradient is first
// spread onto the stride-1 grid, zeros between its rows and columns: both gradients are then the stride-1
// ones of that grid. Paddings past the dilated kernel's reach go to ATen's backward.
// The backward reads g and x once per plane and makes both gradients in that pass; the weight gradient's
// per-plane partial sums are added over the batch in a fixed order, so it is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/simd.h"

namespace accel {
namespace {

struct Geometry {
  int64_t N, C, H, W, KH, KW, OH, OW;
  int64_t sh, sw, ph, pw, dh, dw;
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kTile = 16;  // output columns kept in registers by the stride-1 correlation

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A plane of `rows` x `cols` values copied to (top, left) of a zeroed rows_p x cols_p buffer.
template <typename T, typename A>
void pad_plane(const T* src, int64_t rows, int64_t cols, int64_t top, int64_t left, int64_t rows_p, int64_t cols_p,
               std::vector<A>& dst) {
  dst.assign(rows_p * cols_p, A(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[(r + top) * cols_p + c + left] = static_cast<A>(src[r * cols + c]);
}

// out[i, j] = sum_{a,b} w[a, b] * in[i + a*dh, j + b*dw] for i < OH, j < OW (stride 1), over a padded plane
// whose rows are cols_p >= round_up(OW, kTile) + (KW - 1) * dw wide.
template <typename T, typename A>
inline void correlate(const A* in, int64_t cols_p, const A* w, int64_t KH, int64_t KW, int64_t dh, int64_t dw,
                      int64_t OH, int64_t OW, T* out) {
  for (int64_t i = 0; i < OH; ++i) {
    for (int64_t j0 = 0; j0 < OW; j0 += kTile) {
      A acc[kTile] = {};
      for (int64_t a = 0; a < KH; ++a) {
        const A* row = in + (i + a * dh) * cols_p + j0;
        for (int64_t b = 0; b < KW; ++b) {
          const A wab = w[a * KW + b];
          const A* __restrict x = row + b * dw;
          for (int64_t l = 0; l < kTile; ++l) acc[l] += wab * x[l];
        }
      }
      const int64_t n = std::min(kTile, OW - j0);
      for (int64_t l = 0; l < n; ++l) out[i * OW + j0 + l] = static_cast<T>(acc[l]);
    }
  }
}

constexpr int64_t kMaxTaps = 64;  // kernel taps the stride-1 backward keeps on the stack (8x8)

// The fused path needs the padding within the dilated kernel's reach (always so in DARTS) and at most
// kMaxTaps taps; anything else takes ATen's backward.
bool fast_path(const Geometry& g) {
  return g.ph <= (g.KH - 1) * g.dh && g.pw <= (g.KW - 1) * g.dw && g.KH * g.KW <= kMaxTaps;
}

template <typename T>
ACCEL_CPU_CLONES void backward_plane_s1(const Geometry& g, const T* grad, const T* x, const T* w, T* gx, double* gw) {
  using A = acc_t<T>;
  const int64_t taps = g.KH * g.KW;
  if (gx) {
    // gx = correlation of g, padded by the kernel's reach minus the padding, with the flipped kernel.
    const int64_t top = (g.KH - 1) * g.dh - g.ph, left = (g.KW - 1) * g.dw - g.pw;
    const int64_t cols_p = round_up(g.W, kTile) + (g.KW - 1) * g.dw;
    thread_local std::vector<A> gp;
    pad_plane(grad, g.OH, g.OW, top, left, g.H + (g.KH - 1) * g.dh, cols_p, gp);
    A flipped[kMaxTaps];
    for (int64_t t = 0; t < taps; ++t) flipped[t] = static_cast<A>(w[taps - 1 - t]);
    correlate(gp.data(), cols_p, flipped, g.KH, g.KW, g.dh, g.dw, g.H, g.W, gx);
  }
  if (gw) {
    const int64_t ow_p = round_up(g.OW, kTile);
    // Wide enough for x too: at stride > 1, OW is the spread gradient's, (OW - 1) s + 1, up to s - 1 columns short
    // of a stride-1 output, and the reads' width alone (W = 18, 1x1, stride 3: 16) had pad_plane write past it.
    const int64_t cols_p = std::max(ow_p + (g.KW - 1) * g.dw, g.pw + g.W);
    thread_local std::vector<A> xp, grow;
    pad_plane(x, g.H, g.W, g.ph, g.pw, g.H + 2 * g.ph, cols_p, xp);
    grow.assign(ow_p, A(0));  // one row of g, zero past OW so the padded tile adds nothing
    A acc[kMaxTaps][kTile] = {};
    for (int64_t i = 0; i < g.OH; ++i) {
      std::copy(grad + i * g.OW, grad + (i + 1) * g.OW, grow.begin());
      for (int64_t a = 0; a < g.KH; ++a) {
        const A* row = xp.data() + (i + a * g.dh) * cols_p;
        for (int64_t b = 0; b < g.KW; ++b) {
          A* __restrict lanes = acc[a * g.KW + b];
          const A* __restrict xs = row + b * g.dw;
          for (int64_t j0 = 0; j0 < ow_p; j0 += kTile)
            for (int64_t l = 0; l < kTile; ++l) lanes[l] += grow[j0 + l] * xs[j0 + l];
        }
      }
    }
    for (int64_t t = 0; t < taps; ++t) {
      double s = 0.0;
      for (int64_t l = 0; l < kTile; ++l) s += acc[t][l];
      gw[t] = s;
    }
  }
}

// The backward of one plane at any stride: at stride > 1, g spread onto the stride-1 grid ((OH - 1) sh + 1
// rows, zeros between) has the same gradients as a stride-1 convolution's output gradient.
template <typename T>
void backward_plane(const Geometry& g, const T* grad, const T* x, const T* w, T* gx, double* gw) {
  if (g.sh == 1 && g.sw == 1) return backward_plane_s1(g, grad, x, w, gx, gw);
  Geometry g1 = g;
  g1.OH = (g.OH - 1) * g.sh + 1, g1.OW = (g.OW - 1) * g.sw + 1, g1.sh = g1.sw = 1;
  thread_local std::vector<T> spread;
  spread.assign(g1.OH * g1.OW, T(0));
  for (int64_t i = 0; i < g.OH; ++i)
    for (int64_t j = 0; j < g.OW; ++j) spread[i * g.sh * g1.OW + j * g.sw] = grad[i * g.OW + j];
  backward_plane_s1(g1, spread.data(), x, w, gx, gw);
}

Geometry geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "depthwise_conv2d: x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "depthwise_conv2d: weight must have shape (C, 1, kh, kw) with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "depthwise_conv2d: x is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "depthwise_conv2d: x must be float32 or float64 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "depthwise_conv2d: x and weight must be on the CPU");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_conv2d: stride, padding and dilation must have two entries each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "depthwise_conv2d: stride and dilation must be > 0 and padding >= 0, got stride ", stride, ", padding ",
              padding, ", dilation ", dilation);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), 0, 0,
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "depthwise_conv2d: the output would be empty (", g.OH, " x ", g.OW,
              "): the dilated kernel is larger than the padded input");
  return g;
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(x, weight, stride, padding, dilation);
  return at::conv2d(x, weight, {}, stride, padding, dilation, g.C).contiguous();
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                 const at::Tensor& weight_in, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 std::array<bool, 2> output_mask) {
  const Geometry g = geometry(x_in, weight_in, stride, padding, dilation);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.N, g.C, g.OH, g.OW}) && grad_in.scalar_type() == x_in.scalar_type(),
              "depthwise_conv2d_backward: grad must have the output's shape (", g.N, ", ", g.C, ", ", g.OH, ", ", g.OW,
              ") and dtype, got ", grad_in.sizes(), " ", grad_in.scalar_type());
  if (!fast_path(g)) {
    auto [gx, gw, unused] = at::convolution_backward(grad_in, x_in, weight_in, std::nullopt, stride, padding,
                                                      dilation, false, {0, 0}, g.C, {output_mask[0], output_mask[1], false});
    return {gx.defined() ? gx.contiguous() : gx, gw.defined() ? gw.contiguous() : gw};
  }
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad = grad_in.contiguous();
  const bool want_gx = output_mask[0], want_gw = output_mask[1];
  at::Tensor gx = want_gx ? at::empty_like(x) : at::Tensor();
  at::Tensor gw = want_gw ? at::zeros_like(weight) : at::Tensor();
  if (x.numel() == 0) {
    if (want_gx) gx.zero_();
    return {gx, gw};
  }
  const int64_t taps = g.KH * g.KW;
  std::vector<double> partial(want_gw ? g.N * g.C * taps : 0);  // per plane, summed over n in order below
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = want_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        backward_plane<scalar_t>(g, gp + p * g.OH * g.OW, xp + p * g.H * g.W, wp + (p % g.C) * taps,
                                    gxp ? gxp + p * g.H * g.W : nullptr, want_gw ? partial.data() + p * taps : nullptr);
    });
    if (want_gw) {
      scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t t = 0; t < taps; ++t) {
          double s = 0.0;
          for (int64_t n = 0; n < g.N; ++n) s += partial[(n * g.C + c) * taps + t];
          gwp[c * taps + t] = static_cast<scalar_t>(s);
        }
    }
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace accel
