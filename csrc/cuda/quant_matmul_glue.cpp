// Registers the CUDA kernel of accel::int8_linear (quant_matmul.cu) with the dispatcher. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace accel {

cudaError_t int8_linear_cuda(const float* x, const int8_t* qw, const float* step_w, const float* bias, int64_t M,
                             int64_t K, int64_t Kp, int64_t N, int8_t* qx, float* step_x, float* out,
                             cudaStream_t stream);

namespace {

at::Tensor int8_linear_cuda_op(const at::Tensor& x_in, const at::Tensor& qw_in, const at::Tensor& step_w_in,
                               const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int8_linear: x must be (M, K) float32");
  TORCH_CHECK(qw_in.dim() == 2 && qw_in.scalar_type() == at::kChar && qw_in.size(1) % 32 == 0 &&
                  qw_in.size(1) >= x_in.size(1),
              "int8_linear: weight codes must be (N, Kp) int8 with Kp >= K a multiple of 32");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), step_w = step_w_in.to(at::kFloat).contiguous();
  auto qw = qw_in.contiguous();
  if (reinterpret_cast<uintptr_t>(qw.data_ptr()) % 4 != 0) qw = qw.clone();  // the kernel reads words of 4 codes
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), Kp = qw.size(1);
  auto qx = at::empty({M, Kp}, qw.options());
  auto step_x = at::empty({M}, x.options());
  auto out = at::empty({M, N}, x.options());
  const auto status = int8_linear_cuda(x.data_ptr<float>(), qw.data_ptr<int8_t>(), step_w.data_ptr<float>(),
                                       bias.defined() ? bias.data_ptr<float>() : nullptr, M, K, Kp, N,
                                       qx.data_ptr<int8_t>(), step_x.data_ptr<float>(), out.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "int8_linear: CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CUDA, m) { m.impl("int8_linear", &int8_linear_cuda_op); }

}  // namespace accel
