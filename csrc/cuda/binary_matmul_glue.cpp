// Registers the CUDA kernel of accel::binary_matmul (binary_matmul.cu) with the dispatcher. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace accel {

cudaError_t binary_matmul_cuda(const uint32_t* a, const uint32_t* b, int64_t M, int64_t N, int64_t W, int64_t k,
                               const float* scale, bool scalar_scale, const float* bias, int32_t* out_int,
                               float* out_float, cudaStream_t stream);

namespace {

at::Tensor binary_matmul_cuda_op(const at::Tensor& a_in, const at::Tensor& b_in, int64_t k,
                                 const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.scalar_type() == at::kInt && b_in.scalar_type() == at::kInt,
              "binary_matmul: a_bits and b_bits must be 2-D int32 tensors of packed bits");
  TORCH_CHECK(a_in.size(1) == b_in.size(1), "binary_matmul: a_bits and b_bits must have the same number of words");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const bool epilogue = scale_in.has_value() || bias_in.has_value();
  at::Tensor scale, bias;
  if (scale_in.has_value()) scale = scale_in->to(at::kFloat).contiguous();
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  auto out = at::empty({a.size(0), b.size(0)}, a.options().dtype(epilogue ? at::kFloat : at::kInt));
  const auto status = binary_matmul_cuda(
      reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>()), reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>()),
      a.size(0), b.size(0), a.size(1), k, scale.defined() ? scale.data_ptr<float>() : nullptr,
      scale.defined() && scale.numel() == 1, bias.defined() ? bias.data_ptr<float>() : nullptr,
      epilogue ? nullptr : out.data_ptr<int32_t>(), epilogue ? out.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "binary_matmul: CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CUDA, m) { m.impl("binary_matmul", &binary_matmul_cuda_op); }

}  // namespace accel
