// The LSSL's long convolution y = act(K * u + D u) on the CPU, forward and backward, by FFT at length 2L.
//
// u is (B, L, H) batch-first, K (H, M, Lk) with Lk <= L, an optional K_reverse of the same shape reaching into
// the future (bidirectional layers), D (H, M), y (B, L, H, M). Both kernels are laid into one length-2L
// circular kernel, [K, 0 ..., flip(K_reverse)], so one product of spectra gives both directions.
//
// Features are processed in blocks sized so that one block's spectra take about kSpectrumBytes, not all H
// features' (at B = 16, H = 256, L = 16k the full spectra alone would take 1 GiB). Each block is copied
// with time as its last, contiguous axis, along which the FFTs run, into a buffer already zero-padded to 2L
// (an FFT asked to pad its input to 2L copies it once more: about 40% of the FFT's own time). The passes
// between the two layouts (time-last for the FFTs, batch-first for u, y and their gradients) run over
// tiles of kTimeTile steps (for_each_tile) and fuse what the element needs: the D skip and the activation
// on the way out of the inverse FFT; the activation's derivative, recomputed from the pre-activation
// (nothing of size B L H M is saved), on the way into the gradient's FFT. All three gradients come from the
// spectra of u and of the output gradient:
//   grad u = corr(K_full, g) + sum_m D g,   grad K_full = sum_b corr(u, g),   grad D = sum_{b,l} g u.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "cpu/simd.h"

namespace accel {
namespace {

constexpr int64_t kSpectrumBytes = int64_t{64} << 20;

// Features per block: the spectra of a block, B x hb x M x (L + 1) complex doubles at most, in kSpectrumBytes.
int64_t block_features(int64_t B, int64_t L, int64_t H, int64_t M) {
  const int64_t per_feature = std::max<int64_t>(1, B * M * (L + 1) * 16);
  return std::max<int64_t>(1, std::min(H, kSpectrumBytes / per_feature));
}

// act in {0: none, 1: gelu (erf)}.
int64_t activation_code(std::optional<c10::string_view> activation) {
  if (!activation.has_value()) return 0;
  if (*activation == "gelu") return 1;
  TORCH_CHECK(false, "causal_conv: activation must be None or 'gelu', got '", std::string(*activation), "'");
}

// The length-2L circular kernel of a block of features: (hb, M, 2L).
at::Tensor full_kernel(const at::Tensor& K, const std::optional<at::Tensor>& K_reverse, int64_t L) {
  auto k = at::constant_pad_nd(K, {0, 2 * L - K.size(2)});
  if (K_reverse.has_value()) {
    // K_reverse[s] sits at 2L - 1 - s: it multiplies u[t + 1 + s].
    k = k + at::constant_pad_nd(K_reverse->flip({2}), {2 * L - K_reverse->size(2), 0});
  }
  return k;
}

constexpr int64_t kTimeTile = 64;

// x (B, L, R) batch-first (any strides) into a new (B, R, 2L) buffer, time last, zero past L: ready for an
// FFT of length 2L with no further copy.
at::Tensor padded_time_last(const at::Tensor& x) {
  const int64_t B = x.size(0), L = x.size(1), R = x.size(2);
  auto out = at::empty({B, R, 2 * L}, x.options());
  out.narrow(2, 0, L).copy_(x.transpose(1, 2));
  out.narrow(2, L, L).zero_();
  return out;
}

// The circular product of u's block with the block's full kernel, no skip, time last: (B, hb, M, 2L) from the
// spectra U (B, hb, L + 1) and Kf (hb, M, L + 1); its first L steps are the convolution.
at::Tensor block_conv(const at::Tensor& U, const at::Tensor& Kf, int64_t L) {
  return at::fft_irfft(U.unsqueeze(2) * Kf, 2 * L, -1);
}

// Calls fn(task, b, t0, t1) over tiles [t0, t1) of kTimeTile steps of each batch element, in parallel. Within
// a tile a pass walks every feature: the time-last rows it touches (kTimeTile contiguous values each) and the
// batch-first rows (hb values at each step) both stay in L2. `task` numbers the tiles (for per-tile partial
// sums).
template <typename Fn>
void for_each_tile(int64_t B, int64_t L, Fn fn) {
  const int64_t tiles = (L + kTimeTile - 1) / kTimeTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / tiles, t0 = (i % tiles) * kTimeTile;
      fn(i, b, t0, std::min(L, t0 + kTimeTile));
    }
  });
}

void check(const at::Tensor& u, const at::Tensor& K, const std::optional<at::Tensor>& D,
           const std::optional<at::Tensor>& K_reverse) {
  TORCH_CHECK(u.dim() == 3, "causal_conv: u must have shape (B, L, H), got ", u.sizes());
  TORCH_CHECK(K.dim() == 3 && K.size(0) == u.size(2) && K.size(2) <= u.size(1), "causal_conv: K must have shape (H, M, Lk) with H = ",
              u.size(2), " and Lk <= L = ", u.size(1), ", got ", K.sizes());
  TORCH_CHECK(u.scalar_type() == K.scalar_type() && (u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble),
              "causal_conv: u and K must both be float32 or both float64");
  if (D.has_value())
    TORCH_CHECK(D->dim() == 2 && D->size(0) == K.size(0) && D->size(1) == K.size(1) && D->scalar_type() == u.scalar_type(),
                "causal_conv: D must have shape (H, M) and u's dtype, got ", D->sizes());
  if (K_reverse.has_value())
    TORCH_CHECK(K_reverse->dim() == 3 && K_reverse->size(0) == K.size(0) && K_reverse->size(1) == K.size(1) &&
                    K_reverse->size(2) <= u.size(1) && K_reverse->scalar_type() == u.scalar_type(),
                "causal_conv: K_reverse must have shape (H, M, Lk) like K, got ", K_reverse->sizes());
}

template <typename T>
void skip_pass(const at::Tensor& z, const at::Tensor& u, const T* D, int64_t h0, at::Tensor& y) {
  // y[b, t, h0 + j, m] = z[b, j, m, t] + D[h0 + j, m] u[b, t, h0 + j]: z time-last (B, hb, M, 2L), y batch-first
  const int64_t B = z.size(0), hb = z.size(1), M = z.size(2), Lz = z.size(3), L = y.size(1), H = y.size(2);
  const T *zp = z.const_data_ptr<T>(), *up = u.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  for_each_tile(B, L, [&](int64_t, int64_t b, int64_t t0, int64_t t1) {
    for (int64_t j = 0; j < hb; ++j)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t h = h0 + j;
        const T* zr = zp + ((b * hb + j) * M + m) * Lz;
        const T d = D ? D[h * M + m] : T(0);
        for (int64_t t = t0; t < t1; ++t) yp[((b * L + t) * H + h) * M + m] = zr[t] + d * up[(b * L + t) * H + h];
      }
  });
}

template <typename T>
void add_skip_in_place(at::Tensor& z, const at::Tensor& u, const T* D, int64_t h0, int64_t L) {
  // z[b, j, m, t] += D[h0 + j, m] u[b, t, h0 + j] for t < L: the pre-activation, time-last
  const int64_t B = z.size(0), hb = z.size(1), M = z.size(2), Lz = z.size(3), H = u.size(2);
  const T* up = u.const_data_ptr<T>();
  T* zp = z.mutable_data_ptr<T>();
  for_each_tile(B, L, [&](int64_t, int64_t b, int64_t t0, int64_t t1) {
    for (int64_t j = 0; j < hb; ++j)
      for (int64_t m = 0; m < M; ++m) {
        T* zr = zp + ((b * hb + j) * M + m) * Lz;
        const T d = D[(h0 + j) * M + m];
        for (int64_t t = t0; t < t1; ++t) zr[t] += d * up[(b * L + t) * H + h0 + j];
      }
  });
}

template <typename T>
void input_gradient_pass(const at::Tensor& gu_t, const at::Tensor& gz, const at::Tensor& u, const T* D, int64_t h0,
                         at::Tensor& gu, double* gD_partial) {
  // gu[b, t, h0 + j] = gu_t[b, j, t] + sum_m D[h0 + j, m] gz[b, j, m, t], and, per tile, the partial sums
  // gD_partial[tile, j, m] = sum over the tile's (b, t) of gz[b, j, m, t] u[b, t, h0 + j]
  const int64_t B = gz.size(0), hb = gz.size(1), M = gz.size(2), Lz = gz.size(3), L = gu.size(1), H = gu.size(2);
  const T *gp = gu_t.const_data_ptr<T>(), *zp = gz.const_data_ptr<T>(), *up = u.const_data_ptr<T>();
  T* op = gu.mutable_data_ptr<T>();
  for_each_tile(B, L, [&](int64_t task, int64_t b, int64_t t0, int64_t t1) {
    for (int64_t j = 0; j < hb; ++j) {
      const int64_t h = h0 + j;
      const T* gr = gp + (b * hb + j) * Lz;
      for (int64_t t = t0; t < t1; ++t) op[(b * L + t) * H + h] = gr[t];
      if (!D) continue;
      for (int64_t m = 0; m < M; ++m) {
        const T* zr = zp + ((b * hb + j) * M + m) * Lz;
        const T d = D[h * M + m];
        double acc = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const T uv = up[(b * L + t) * H + h];
          op[(b * L + t) * H + h] += d * zr[t];
          acc += double(zr[t]) * uv;
        }
        gD_partial[(task * hb + j) * M + m] = acc;
      }
    }
  });
}

// ---- Short sequences: the direct sum over lags ----
//
// Up to kDirectMaxLength steps (and M = 1), y[t] = sum_d kc[d] u[t - d] over the lags d of the combined kernel
// (kc[d] = K[d] for d >= 0, K_reverse[-d - 1] for d < 0) is summed directly: B L (Lk + Lr) H multiply-adds,
// vectorised over features, instead of three FFTs of length 2L and the passes between layouts. Every pass
// here (the forward, the input gradient and the kernel gradient) is a correlation of lag rows with a
// zero-padded, batch-first input, out[t] = sum_q w[q] x[t + q] or its transpose, so one blocked kernel of
// each form serves them all. Measured on 2 AVX2 cores at B = 16, H = 256, with D and GELU, fwd / fwd+bwd in
// ms, FFT against direct: L = 32: 1.6 / 5.9 against 1.3 / 3.4; L = 64: 3.1 / 9.5 against 1.6 / 6.5; L = 128:
// 5.3 / 18.0 against 3.8 / 17.0. Tried first and dropped: the same sums as ATen GEMMs against each feature's
// L x L Toeplitz matrix, slower than the FFT path at every L from 64 up (16-column products, and the
// matrices cost as much to build as the FFTs).
constexpr int64_t kDirectMaxLength = 128;
constexpr int64_t kLanes = 8;  // features per vector: 8 floats (AVX2); float64 uses the same blocking
constexpr int64_t kRows = 8;   // output rows (steps or lags) per register block

// x (B, L, H) into (B, front + L + back, Hp) with zero rows around it and Hp = H rounded up to kLanes.
at::Tensor padded_rows(const at::Tensor& x, int64_t front, int64_t back) {
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), Hp = (H + kLanes - 1) / kLanes * kLanes;
  auto out = at::empty({B, front + L + back, Hp}, x.options());
  out.narrow(1, 0, front).zero_();
  out.narrow(1, front + L, back).zero_();
  if (Hp > H) out.narrow(1, front, L).narrow(2, H, Hp - H).zero_();
  out.narrow(1, front, L).narrow(2, 0, H).copy_(x);
  return out;
}

// Both direct passes reduce to one block: acc[i][v] = sum_{j < J} a[j, v] x[base + i + j, v] for kRows
// consecutive i and kLanes features, rows of a and x Hp apart. The forward and the input gradient take
// a = lag rows, j = lag, base = first step; the kernel gradient takes a = gradient rows, j = step, base =
// first lag. Each row of a is loaded once per block and feeds kRows x kLanes accumulators. Portable form.
template <typename T>
void lag_block_portable(const T* __restrict a, const T* __restrict x, int64_t J, int64_t Hp, int64_t base,
                        T* __restrict acc) {
  T sum[kRows][kLanes] = {};
  for (int64_t j = 0; j < J; ++j) {
    const T* aj = a + j * Hp;
    for (int64_t i = 0; i < kRows; ++i) {
      const T* xr = x + (base + i + j) * Hp;
      for (int64_t v = 0; v < kLanes; ++v) sum[i][v] += aj[v] * xr[v];
    }
  }
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t v = 0; v < kLanes; ++v) acc[i * kLanes + v] = sum[i][v];
}

#if defined(ACCEL_X86_AVX2)
// The float block with AVX2 + FMA: the kRows accumulators are eight registers of kLanes = 8 floats, so a step
// of the sum is one load of a, eight loads of x and eight FMAs. Written with intrinsics: GCC's clones of the
// portable loop keep the accumulators in memory (measured 3-4x slower).
ACCEL_AVX2 void lag_block_avx2(const float* a, const float* x, int64_t J, int64_t Hp,
                                                        int64_t base, float* acc) {
  __m256 sum[kRows];
  for (int i = 0; i < kRows; ++i) sum[i] = _mm256_setzero_ps();
  const float* xj = x + base * Hp;
  for (int64_t j = 0; j < J; ++j, xj += Hp) {
    const __m256 aj = _mm256_loadu_ps(a + j * Hp);
    for (int i = 0; i < kRows; ++i) sum[i] = _mm256_fmadd_ps(aj, _mm256_loadu_ps(xj + i * Hp), sum[i]);
  }
  for (int i = 0; i < kRows; ++i) _mm256_storeu_ps(acc + i * kLanes, sum[i]);
}
#endif

template <typename T>
void lag_block(const T* a, const T* x, int64_t J, int64_t Hp, int64_t base, T* acc) {
#if defined(ACCEL_X86_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return lag_block_avx2(a, x, J, Hp, base, acc);
  }
#endif
  lag_block_portable(a, x, J, Hp, base, acc);
}

// out[b, t, h] = sum_q w[q, h] x[b, t + q, h] for t < L: w (R, Hp), x (B, Lp, Hp) with Lp >= L + R - 1 + kRows.
template <typename T>
at::Tensor lag_sum(const at::Tensor& w_in, const at::Tensor& x, int64_t L) {
  const auto w = w_in.contiguous();
  const int64_t R = w.size(0), Hp = w.size(1), B = x.size(0), Lp = x.size(1);
  auto out = at::empty({B, L, Hp}, x.options());
  const T *wp = w.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t chunks = Hp / kLanes;
  at::parallel_for(0, B * chunks, 1, [&](int64_t i0, int64_t i1) {
    T acc[kRows * kLanes];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / chunks, h0 = (i % chunks) * kLanes;
      for (int64_t t0 = 0; t0 < L; t0 += kRows) {
        lag_block<T>(wp + h0, xp + b * Lp * Hp + h0, R, Hp, t0, acc);
        for (int64_t r = 0; r < kRows && t0 + r < L; ++r)
          std::copy(acc + r * kLanes, acc + (r + 1) * kLanes, op + (b * L + t0 + r) * Hp + h0);
      }
    }
  });
  return out;
}

// gw[q, h] = sum_b sum_{t < L} g[b, t, h] x[b, t + q, h] for q < R, as float64: g (B, L, Hp), x (B, Lp, Hp)
// with Lp >= L + R - 1 + kRows. Each batch element's sum in T, the batch's in float64.
template <typename T>
at::Tensor lag_correlation(const at::Tensor& g, const at::Tensor& x, int64_t R) {
  const int64_t B = g.size(0), L = g.size(1), Hp = g.size(2), Lp = x.size(1);
  auto out = at::empty({R, Hp}, g.options().dtype(at::kDouble));
  const T *gp = g.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
  double* op = out.mutable_data_ptr<double>();
  const int64_t chunks = Hp / kLanes, blocks = (R + kRows - 1) / kRows;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t i0, int64_t i1) {
    T acc[kRows * kLanes];
    double total[kRows * kLanes];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h0 = (i % chunks) * kLanes, q0 = (i / chunks) * kRows;
      std::fill(total, total + kRows * kLanes, 0.0);
      for (int64_t b = 0; b < B; ++b) {
        lag_block<T>(gp + b * L * Hp + h0, xp + b * Lp * Hp + h0, L, Hp, q0, acc);
        for (int64_t k = 0; k < kRows * kLanes; ++k) total[k] += acc[k];
      }
      for (int64_t r = 0; r < kRows && q0 + r < R; ++r)
        std::copy(total + r * kLanes, total + (r + 1) * kLanes, op + (q0 + r) * Hp + h0);
    }
  });
  return out;
}

// The lag rows of the combined kernel, (Lr + Lk, Hp): row Lr + d holds kc[d] for every feature.
at::Tensor lag_rows(const at::Tensor& K, const std::optional<at::Tensor>& K_reverse) {
  auto k = K.select(1, 0);  // (H, Lk)
  if (K_reverse.has_value()) k = at::cat({K_reverse->select(1, 0).flip({-1}), k}, -1);
  return padded_rows(k.t().unsqueeze(0), 0, 0).squeeze(0);
}

bool use_direct(int64_t L, int64_t M) { return L <= kDirectMaxLength && M == 1; }

// z + D u, batch-first (B, L, H, 1): the forward sum y[t] = sum_q wrev[q] u[t - Lk + 1 + q], wrev the lag rows
// from the largest lag down.
at::Tensor direct_pre_activation(const at::Tensor& u, const at::Tensor& K, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& K_reverse) {
  const int64_t L = u.size(1), H = u.size(2), Lk = K.size(2);
  const auto w = lag_rows(K, K_reverse);
  const auto x = padded_rows(u, Lk - 1, w.size(0) + kRows);
  at::Tensor z;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv", [&] { z = lag_sum<scalar_t>(w.flip({0}), x, L); });
  z = z.narrow(2, 0, H).unsqueeze(-1);
  return D.has_value() ? z + *D * u.unsqueeze(-1) : z;
}

// The direct path's gradients: with the lag rows w (row Lr + d = kc[d]) and the pre-activation's gradient gz,
//   grad u[t] = sum_q w[q] gz[t + q - Lr] + D gz[t],   grad w[q] = sum_b sum_t gz[t] u[t + Lr - q].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> direct_backward(
    const at::Tensor& grad, const at::Tensor& u, const at::Tensor& K, const std::optional<at::Tensor>& D, int64_t act,
    const std::optional<at::Tensor>& K_reverse, at::Tensor gu, at::Tensor gK, at::Tensor gD, at::Tensor gKr) {
  const int64_t L = u.size(1), H = u.size(2), Lk = K.size(2);
  const int64_t Lr = K_reverse.has_value() ? K_reverse->size(2) : 0;
  auto g = grad;  // (B, L, H, 1)
  if (act == 1) g = at::gelu_backward(g, direct_pre_activation(u, K, D, K_reverse));
  const auto gz = g.select(3, 0);
  const auto w = lag_rows(K, K_reverse);
  const int64_t R = w.size(0);
  at::Tensor gu_sum, gw_rev;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv_backward", [&] {
    gu_sum = lag_sum<scalar_t>(w, padded_rows(gz, Lr, R + kRows), L);
    gw_rev = lag_correlation<scalar_t>(padded_rows(gz, 0, 0), padded_rows(u, Lk - 1, R + kRows), R);
  });
  gu.copy_(gu_sum.narrow(2, 0, H));
  if (D.has_value()) gu += gz * D->select(1, 0);
  const auto gw = gw_rev.flip({0}).narrow(1, 0, H).t();  // (H, R): column Lr + d is kc[d]'s gradient
  gK.select(1, 0).copy_(gw.narrow(1, Lr, Lk));
  if (K_reverse.has_value()) gKr.select(1, 0).copy_(gw.narrow(1, 0, Lr).flip({1}));
  if (D.has_value()) gD.select(1, 0).copy_((gz.to(at::kDouble) * u).sum(at::IntArrayRef{0, 1}));
  return {gu, gK, gD, gKr};
}

at::Tensor forward_cpu(const at::Tensor& u_in, const at::Tensor& K_in, const std::optional<at::Tensor>& D_in,
                       std::optional<c10::string_view> activation, const std::optional<at::Tensor>& K_reverse_in) {
  check(u_in, K_in, D_in, K_reverse_in);
  const int64_t act = activation_code(activation);
  const auto u = u_in.contiguous();
  const int64_t B = u.size(0), L = u.size(1), H = u.size(2), M = K_in.size(1);
  const auto D = D_in.has_value() ? std::optional<at::Tensor>(D_in->contiguous()) : std::nullopt;
  if (use_direct(L, M) && u.numel() > 0) {
    auto y = direct_pre_activation(u, K_in, D, K_reverse_in).contiguous();
    if (act == 1) at::gelu_out(y, y);
    return y;
  }
  auto y = at::empty({B, L, H, M}, u.options());
  if (y.numel() == 0) return y;
  const int64_t block = block_features(B, L, H, M);
  for (int64_t h0 = 0; h0 < H; h0 += block) {
    const int64_t hb = std::min(block, H - h0);
    std::optional<at::Tensor> Kr;
    if (K_reverse_in.has_value()) Kr = K_reverse_in->narrow(0, h0, hb);
    const auto U = at::fft_rfft(padded_time_last(u.narrow(2, h0, hb)), std::nullopt, -1);
    const auto Kf = at::fft_rfft(full_kernel(K_in.narrow(0, h0, hb), Kr, L), std::nullopt, -1);
    const auto z = block_conv(U, Kf, L);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv", [&] {
      skip_pass<scalar_t>(z, u, D ? D->const_data_ptr<scalar_t>() : nullptr, h0, y);
    });
  }
  // ATen's GELU: vectorised erf (a scalar erf per element in the pass above took 10x as long)
  if (act == 1) at::gelu_out(y, y);
  return y;
}

// Returns grad u, grad K, grad D and grad K_reverse; the last two are empty (shape (0,)) when D or K_reverse
// is not given (an op cannot return None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& K_in, const std::optional<at::Tensor>& D_in,
    std::optional<c10::string_view> activation, const std::optional<at::Tensor>& K_reverse_in) {
  check(u_in, K_in, D_in, K_reverse_in);
  const int64_t act = activation_code(activation);
  const auto u = u_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t B = u.size(0), L = u.size(1), H = u.size(2), M = K_in.size(1), Lk = K_in.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, L, H, M}), "causal_conv_backward: grad must have shape (B, L, H, M)");
  auto gu = at::empty_like(u);
  auto gK = at::empty_like(K_in, at::MemoryFormat::Contiguous);
  const auto D = D_in.has_value() ? std::optional<at::Tensor>(D_in->contiguous()) : std::nullopt;
  auto gD = D.has_value() ? at::empty_like(*D) : u.new_empty({0});
  auto gKr = K_reverse_in.has_value() ? at::empty_like(*K_reverse_in, at::MemoryFormat::Contiguous) : u.new_empty({0});
  if (u.numel() == 0 || M == 0) {
    gu.zero_(), gK.zero_(), gD.zero_(), gKr.zero_();
    return {gu, gK, gD, gKr};
  }
  if (use_direct(L, M)) return direct_backward(grad, u, K_in, D, act, K_reverse_in, gu, gK, gD, gKr);
  const int64_t block = block_features(B, L, H, M), tiles = B * ((L + kTimeTile - 1) / kTimeTile);
  for (int64_t h0 = 0; h0 < H; h0 += block) {
    const int64_t hb = std::min(block, H - h0);
    std::optional<at::Tensor> Kr;
    if (K_reverse_in.has_value()) Kr = K_reverse_in->narrow(0, h0, hb);
    const auto U = at::fft_rfft(padded_time_last(u.narrow(2, h0, hb)), std::nullopt, -1);      // (B, hb, L + 1)
    const auto Kf = at::fft_rfft(full_kernel(K_in.narrow(0, h0, hb), Kr, L), std::nullopt, -1);  // (hb, M, L + 1)
    // gz: the gradient of the pre-activation, time-last (B, hb, M, 2L), zero past L
    auto gz = padded_time_last(grad.narrow(2, h0, hb).flatten(2)).view({B, hb, M, 2 * L});
    if (act == 1) {
      auto z = block_conv(U, Kf, L);  // recomputed from the spectra: the forward saved nothing of this size
      if (D.has_value())
        AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv_backward",
                                   [&] { add_skip_in_place<scalar_t>(z, u, D->const_data_ptr<scalar_t>(), h0, L); });
      gz = at::gelu_backward(gz, z);  // past L, gz is 0 and stays 0
    }
    const auto G = at::fft_rfft(gz, std::nullopt, -1);  // (B, hb, M, L + 1)
    // grad u[t] = sum_m sum_p K_full[p] gz[t + p]: a correlation, conj(K) G
    const auto gu_t = at::fft_irfft((G * Kf.conj()).sum(2), 2 * L, -1);  // (B, hb, 2L)
    auto gD_partial = at::zeros({tiles, hb, M}, u.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv_backward", [&] {
      input_gradient_pass<scalar_t>(gu_t, gz, u, D ? D->const_data_ptr<scalar_t>() : nullptr, h0, gu,
                                    gD_partial.mutable_data_ptr<double>());
    });
    // grad K_full[p] = sum_b sum_t gz[t] u[t - p mod 2L]: conj(U) G summed over the batch
    const auto gk_full = at::fft_irfft((G * U.conj().unsqueeze(2)).sum(0), 2 * L, -1);  // (hb, M, 2L)
    gK.narrow(0, h0, hb).copy_(gk_full.narrow(-1, 0, Lk));
    if (K_reverse_in.has_value()) {
      const int64_t Lr = gKr.size(2);
      // K_reverse[s] sat at 2L - 1 - s
      gKr.narrow(0, h0, hb).copy_(gk_full.narrow(-1, 2 * L - Lr, Lr).flip({-1}));
    }
    if (D.has_value()) gD.narrow(0, h0, hb).copy_(gD_partial.sum(0));  // tiles summed in a fixed order
  }
  return {gu, gK, gD, gKr};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("causal_conv", &forward_cpu);
  m.impl("causal_conv_backward", &backward_cpu);
}

}  // namespace accel
