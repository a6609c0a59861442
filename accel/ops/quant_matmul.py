"""accel.ops.quant_matmul: x @ W^T (+ bias) with W quantized by accel.ops.quantize, on the small integers.

- 8 bits, symmetric, one group per row (per output channel): the activations are quantized per row inside the op
  (dynamic quantization), and the int8 x int8 products accumulate in int32, scaled back in the epilogue
  (torch.ops.accel.int8_linear).
- 4 bits, minmax groups (weight-only): float32 activations against the 4-bit codes (torch.ops.accel.int4_linear);
  the CPU kernel multiplies the codes as bytes against each activation split into three int8 digits, exact to
  6e-8 of the row's largest value, so the result keeps float32 accuracy (the activations are not quantized);
  from 32 rows, where the product is compute-bound, it dequantizes blocks of 256 channels and lets MKL multiply.
- Other combinations (2 bits, symmetric 4-bit groups, grouped int8): dequantized to float32 and multiplied by
  torch, correct but with no speed-up.
Kernels: C++ on the CPU (csrc/cpu/quant_matmul.cpp); Triton on CUDA (kernels/quant_matmul.py, tested under the
interpreter only); elsewhere the PyTorch references below.

Gradients: the packed weights are frozen (integers); x and the bias get the gradient of x W_hat^T + b, W_hat the
dequantized weights (straight through the activations' quantization at 8 bits), so layers before a quantized one
and adapters beside it train (QLoRA's recipe). Training the weights themselves uses fake quantization
(accel.nn.QuantLinear).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from accel.ops._library import lib, register_backends, triton_kernel
from accel.ops.quantize import QuantizedWeight, check_quantized_weight, dequantize, unpack_codes
from accel.reference import quant as reference

lib.define("int8_linear(Tensor x, Tensor w_codes, Tensor w_step, Tensor? bias) -> Tensor")
lib.define("int4_linear(Tensor x, Tensor w_packed, Tensor step, Tensor offset, int group_size, Tensor? bias) -> Tensor")


def quant_matmul(x: Tensor, qweight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x (..., K) float -> (..., N) float32 (in x's dtype when x is not float32)."""
    check_quantized_weight("quant_matmul", "qweight", qweight)
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError("quant_matmul: `x` must be a floating-point tensor")
    if x.dim() == 0 or x.shape[-1] != qweight.in_features:
        raise ValueError(f"quant_matmul: `x` must have {qweight.in_features} features, got shape {tuple(x.shape)}")
    if x.device != qweight.codes.device:
        raise ValueError(f"quant_matmul: `x` is on {x.device} but the weight is on {qweight.codes.device}")
    N = qweight.codes.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (N,)):
        raise ValueError(f"quant_matmul: `bias` must have shape ({N},)")
    if bias is not None and not bias.dtype.is_floating_point:
        raise TypeError(f"quant_matmul: `bias` must be floating point, got {bias.dtype}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"quant_matmul: `bias` is on {bias.device} but `x` is on {x.device}")
    rows = x.reshape(-1, x.shape[-1]).float()
    Kp = qweight.padded_features
    one_group = qweight.step.shape[1] == 1
    if qweight.bits == 8 and qweight.scheme == "symmetric" and one_group:
        out = torch.ops.accel.int8_linear(rows, qweight.codes, qweight.step[:, 0], bias)
    elif qweight.bits == 4 and qweight.scheme == "minmax":
        padded = rows if Kp == rows.shape[1] else F.pad(rows, (0, Kp - rows.shape[1]))
        out = torch.ops.accel.int4_linear(padded, qweight.codes, qweight.step, qweight.offset, qweight.group_size, bias)
    else:
        out = F.linear(rows, dequantize(qweight), None if bias is None else bias.float())
    return out.reshape(*x.shape[:-1], N).to(x.dtype)


def _int8_reference(x, w_codes, w_step, bias):
    qx, sx, _ = reference.quantize(x, 8, None, "symmetric")
    padded = F.pad(qx, (0, w_codes.shape[1] - qx.shape[1]))
    out = (padded @ w_codes.double().T) * sx * w_step.double()
    return (out if bias is None else out + bias.double()).float()


def _int4_reference(x, w_packed, step, offset, group_size, bias):
    qw = QuantizedWeight(w_packed, step, offset, 4, group_size, "minmax", x.shape[1])
    w = reference.dequantize(unpack_codes(qw), step, offset)
    out = x.double() @ w.T
    return (out if bias is None else out + bias.double()).float()


@torch.library.register_fake("accel::int8_linear")
def _int8_fake(x, w_codes, w_step, bias):
    return x.new_empty(x.shape[0], w_codes.shape[0])


@torch.library.register_fake("accel::int4_linear")
def _int4_fake(x, w_packed, step, offset, group_size, bias):
    return x.new_empty(x.shape[0], w_packed.shape[0])


def _int8_setup(ctx, inputs, output):
    x, w_codes, w_step, bias = inputs
    ctx.save_for_backward(w_codes, w_step)
    ctx.features = x.shape[1]


def _int8_backward(ctx, grad):
    w_codes, w_step = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ (w_codes[:, :ctx.features].float() * w_step[:, None])
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_bias


def _int4_setup(ctx, inputs, output):
    x, w_packed, step, offset, group_size, bias = inputs
    ctx.save_for_backward(w_packed, step, offset)
    ctx.group_size = group_size


def _int4_backward(ctx, grad):
    w_packed, step, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:  # x arrives padded to whole groups, as the codes are
        qw = QuantizedWeight(w_packed, step, offset, 4, ctx.group_size, "minmax", step.shape[1] * ctx.group_size)
        grad_x = grad @ dequantize(qw)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, None, None, grad_bias


torch.library.register_autograd("accel::int8_linear", _int8_backward, setup_context=_int8_setup)
torch.library.register_autograd("accel::int4_linear", _int4_backward, setup_context=_int4_setup)

register_backends("int8_linear", _int8_reference, triton_kernel("quant_matmul", "int8_linear"))
register_backends("int4_linear", _int4_reference, triton_kernel("quant_matmul", "int4_linear"))
