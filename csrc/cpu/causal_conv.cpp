// The LSSL's long convolution y = act(K * u + D u) on the CPU, forward and backward, by FFT at length 2L.
//
// u is (B, L, H) batch-first, K (H, M, Lk) with Lk <= L, an optional K_reverse of the same shape reaching into
// the future (bidirectional layers), D (H, M), y (B, L, H, M). Both kernels are laid into one length-2L
// circular kernel, [K, 0 ..., flip(K_reverse)], so one product of spectra gives both directions.
//
// Features are processed in blocks sized so that one block's spectra take about kSpectrumBytes, not all H
// features' (at B = 16, H = 256, L = 16k the full spectra alone would take 1 GiB); each block is copied
// with time as its last, contiguous axis, along which the FFTs run. The D skip and the activation are applied in the pass that writes y out of the block's
// inverse FFT. The backward recomputes the pre-activation where the activation needs it (nothing of size
// B L H M is saved), and gets all three gradients from the spectra of u and of the output gradient:
//   grad u = corr(K_full, g) + sum_m D g,   grad K_full = sum_b corr(u, g),   grad D = sum_{b,l} g u.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

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

// u's block (B, L, hb) with time last: (B, hb, L), contiguous.
at::Tensor time_last(const at::Tensor& u_block) { return u_block.transpose(1, 2).contiguous(); }

// conv (B, L, hb, M) = the circular product of u's block with the block's full kernel, no skip, from their
// spectra: U (B, hb, L + 1) of u's block with time last, Kf (hb, M, L + 1) of the full kernel.
at::Tensor block_conv(const at::Tensor& U, const at::Tensor& Kf, int64_t L) {
  return at::fft_irfft(U.unsqueeze(2) * Kf, 2 * L, -1).narrow(-1, 0, L).permute({0, 3, 1, 2});
}

inline double gelu(double z) { return 0.5 * z * (1.0 + std::erf(z * M_SQRT1_2)); }

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
void epilogue(const at::Tensor& conv, const at::Tensor& u, const T* D, int64_t act, int64_t h0, at::Tensor& y) {
  // y[b, l, h0 + j, m] = act(conv[b, l, j, m] + D[h0 + j, m] u[b, l, h0 + j])
  const int64_t B = conv.size(0), L = conv.size(1), hb = conv.size(2), M = conv.size(3), H = y.size(2);
  const auto c = conv.contiguous();
  const T* cp = c.const_data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, B * L, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < hb; ++j) {
        const int64_t h = h0 + j;
        const T uv = up[r * H + h];
        for (int64_t m = 0; m < M; ++m) {
          double z = cp[(r * hb + j) * M + m] + (D ? double(D[h * M + m]) * uv : 0.0);
          yp[(r * H + h) * M + m] = static_cast<T>(act == 1 ? gelu(z) : z);
        }
      }
  });
}

at::Tensor forward_cpu(const at::Tensor& u_in, const at::Tensor& K_in, const std::optional<at::Tensor>& D_in,
                       std::optional<c10::string_view> activation, const std::optional<at::Tensor>& K_reverse_in) {
  check(u_in, K_in, D_in, K_reverse_in);
  const int64_t act = activation_code(activation);
  const auto u = u_in.contiguous();
  const int64_t B = u.size(0), L = u.size(1), H = u.size(2), M = K_in.size(1);
  auto y = at::empty({B, L, H, M}, u.options());
  if (y.numel() == 0) return y;
  const auto D = D_in.has_value() ? std::optional<at::Tensor>(D_in->contiguous()) : std::nullopt;
  const int64_t block = block_features(B, L, H, M);
  for (int64_t h0 = 0; h0 < H; h0 += block) {
    const int64_t hb = std::min(block, H - h0);
    std::optional<at::Tensor> Kr;
    if (K_reverse_in.has_value()) Kr = K_reverse_in->narrow(0, h0, hb);
    const auto U = at::fft_rfft(time_last(u.narrow(2, h0, hb)), 2 * L, -1);
    const auto Kf = at::fft_rfft(full_kernel(K_in.narrow(0, h0, hb), Kr, L), 2 * L, -1);
    const auto conv = block_conv(U, Kf, L);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv", [&] {
      epilogue<scalar_t>(conv, u, D ? D->const_data_ptr<scalar_t>() : nullptr, act, h0, y);
    });
  }
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
  auto gD = D_in.has_value() ? at::empty_like(*D_in, at::MemoryFormat::Contiguous) : u.new_empty({0});
  auto gKr = K_reverse_in.has_value() ? at::empty_like(*K_reverse_in, at::MemoryFormat::Contiguous) : u.new_empty({0});
  const int64_t block = block_features(B, L, H, M);
  for (int64_t h0 = 0; h0 < H; h0 += block) {
    const int64_t hb = std::min(block, H - h0);
    std::optional<at::Tensor> Kr;
    if (K_reverse_in.has_value()) Kr = K_reverse_in->narrow(0, h0, hb);
    const auto k_block = full_kernel(K_in.narrow(0, h0, hb), Kr, L);  // (hb, M, 2L)
    const auto u_block = u.narrow(2, h0, hb);                           // (B, L, hb)
    const auto ut = time_last(u_block);                                 // (B, hb, L)
    const auto U = at::fft_rfft(ut, 2 * L, -1);       // (B, hb, L + 1)
    const auto Kf = at::fft_rfft(k_block, 2 * L, -1);  // (hb, M, L + 1)
    auto g = grad.narrow(2, h0, hb);                    // (B, L, hb, M)
    if (act == 1) {
      // g <- g * gelu'(z), z = conv + D u recomputed from the same spectra
      auto z = block_conv(U, Kf, L);
      if (D_in.has_value()) z = z + D_in->narrow(0, h0, hb) * u_block.unsqueeze(-1);
      g = g * (0.5 * (1 + at::erf(z * M_SQRT1_2)) + z * at::exp(-0.5 * z * z) * (0.5 * M_2_SQRTPI * M_SQRT1_2));
    }
    const auto G = at::fft_rfft(g.permute({0, 2, 3, 1}).contiguous(), 2 * L, -1);  // (B, hb, M, L + 1)
    // grad u[l] = sum_m sum_p K_full[p] g[l + p]: a correlation, conj(K) G
    auto gu_block = at::fft_irfft((G * Kf.conj()).sum(2), 2 * L, -1).narrow(-1, 0, L).transpose(1, 2);  // (B, L, hb)
    if (D_in.has_value()) gu_block = gu_block + (g * D_in->narrow(0, h0, hb)).sum(-1);
    gu.narrow(2, h0, hb).copy_(gu_block);
    // grad K_full[p] = sum_b sum_l g[l] u[l - p mod 2L]: conj(U) G summed over the batch
    const auto gk_full = at::fft_irfft((G * U.conj().unsqueeze(2)).sum(0), 2 * L, -1);  // (hb, M, 2L)
    gK.narrow(0, h0, hb).copy_(gk_full.narrow(-1, 0, Lk));
    if (K_reverse_in.has_value()) {
      const int64_t Lr = gKr.size(2);
      // K_reverse[s] sat at 2L - 1 - s
      gKr.narrow(0, h0, hb).copy_(gk_full.narrow(-1, 2 * L - Lr, Lr).flip({-1}));
    }
    if (D_in.has_value()) gD.narrow(0, h0, hb).copy_((g * u_block.unsqueeze(-1)).sum(at::IntArrayRef{0, 1}));
  }
  return {gu, gK, gD, gKr};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("causal_conv", &forward_cpu);
  m.impl("causal_conv_backward", &backward_cpu);
}

}  // namespace accel
