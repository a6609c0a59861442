// Registers the CUDA kernel of accel::rk_finalize (rk_finalize.cu, the forward) with the dispatcher. Built only
// with CUDA. accel::rk_finalize_backward on CUDA stays with the Triton kernel (kernels/rk_finalize.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace accel {

constexpr int kRkFinalizeMaxWeights = 64;  // as in rk_finalize.cu

cudaError_t rk_finalize_cuda(const float* y0, const float* y1, const float* k, const float* g_prev, const float* h,
                             int64_t s, int64_t B, int64_t D, const double* b_err, double rtol, double atol,
                             float* norm, float* rho, cudaStream_t stream);
cudaError_t rk_finalize_cuda(const double* y0, const double* y1, const double* k, const double* g_prev,
                             const double* h, int64_t s, int64_t B, int64_t D, const double* b_err, double rtol,
                             double atol, double* norm, double* rho, cudaStream_t stream);

namespace {

std::tuple<at::Tensor, at::Tensor> rk_finalize_cuda_op(const at::Tensor& y0_in, const at::Tensor& y1_in,
                                                       const at::Tensor& k_in, const at::Tensor& g_prev_in,
                                                       const at::Tensor& h_in, at::ArrayRef<double> b_err,
                                                       double rtol, double atol) {
  TORCH_CHECK(y0_in.dim() == 2, "rk_finalize: y0 must have shape (B, D), got ", y0_in.sizes());
  const int64_t B = y0_in.size(0), D = y0_in.size(1);
  TORCH_CHECK(y1_in.sizes() == y0_in.sizes() && g_prev_in.sizes() == y0_in.sizes(),
              "rk_finalize: y1 and g_prev must have y0's shape ", y0_in.sizes(), ", got ", y1_in.sizes(), " and ",
              g_prev_in.sizes());
  TORCH_CHECK(k_in.dim() == 3 && k_in.size(0) >= 2 && k_in.size(1) == B && k_in.size(2) == D,
              "rk_finalize: k must have shape (s, B, D) = (s >= 2, ", B, ", ", D, "), got ", k_in.sizes());
  TORCH_CHECK(h_in.dim() == 1 && h_in.size(0) == B, "rk_finalize: h must have shape (B,) = (", B, ",), got ",
              h_in.sizes());
  const auto dtype = y0_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rk_finalize: y0 must be float32 or float64, got ", dtype);
  for (const auto* t : {&y1_in, &k_in, &g_prev_in, &h_in})
    TORCH_CHECK(t->scalar_type() == dtype, "rk_finalize: every tensor must have y0's dtype ", dtype, ", got ",
                t->scalar_type());
  for (const auto* t : {&y0_in, &y1_in, &k_in, &g_prev_in, &h_in})
    TORCH_CHECK(t->device() == y0_in.device(), "rk_finalize: every tensor must be on y0's device ", y0_in.device(),
                ", got ", t->device());
  TORCH_CHECK(static_cast<int64_t>(b_err.size()) == k_in.size(0), "rk_finalize: b_err must have one weight per stage (",
              k_in.size(0), "), got ", b_err.size());
  TORCH_CHECK(std::isfinite(rtol) && std::isfinite(atol) && rtol >= 0 && atol >= 0 && (rtol > 0 || atol > 0),
              "rk_finalize: rtol and atol must be finite and >= 0, not both 0, got rtol=", rtol, ", atol=", atol);
  int64_t nonzero = 0;
  for (const double bi : b_err) nonzero += bi != 0.0;
  TORCH_CHECK(nonzero <= kRkFinalizeMaxWeights, "rk_finalize: the CUDA kernel takes at most ",
              kRkFinalizeMaxWeights, " nonzero b_err weights, got ", nonzero);
  TORCH_CHECK(B <= 0x7fffffff, "rk_finalize: the CUDA kernel takes at most 2^31 - 1 samples, got B = ", B);
  const c10::cuda::CUDAGuard guard(y0_in.device());
  const auto y0 = y0_in.contiguous(), y1 = y1_in.contiguous(), k = k_in.contiguous(), g_prev = g_prev_in.contiguous(),
             h = h_in.contiguous();
  auto norm = at::empty({B}, y0.options());
  auto rho = at::empty({B}, y0.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t s = k.size(0);
  cudaError_t status;
  if (dtype == at::kFloat) {
    status = rk_finalize_cuda(y0.const_data_ptr<float>(), y1.const_data_ptr<float>(), k.const_data_ptr<float>(),
                              g_prev.const_data_ptr<float>(), h.const_data_ptr<float>(), s, B, D, b_err.data(), rtol,
                              atol, norm.mutable_data_ptr<float>(), rho.mutable_data_ptr<float>(), stream);
  } else {
    status = rk_finalize_cuda(y0.const_data_ptr<double>(), y1.const_data_ptr<double>(), k.const_data_ptr<double>(),
                              g_prev.const_data_ptr<double>(), h.const_data_ptr<double>(), s, B, D, b_err.data(),
                              rtol, atol, norm.mutable_data_ptr<double>(), rho.mutable_data_ptr<double>(), stream);
  }
  TORCH_CHECK(status == cudaSuccess, "rk_finalize: CUDA launch failed: ", cudaGetErrorString(status));
  return {norm, rho};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CUDA, m) { m.impl("rk_finalize", &rk_finalize_cuda_op); }

}  // namespace accel
