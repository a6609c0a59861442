"""accel.ops.depthwise_conv2d: depthwise 2-D convolution (groups = channels), forward and backward.

The spatial half of DARTS' sep_conv and dil_conv candidates. PyTorch's CPU backward for this
convolution runs 10-50x slower than its forward; the C++ backward (csrc/cpu/depthwise_conv2d.cpp) makes
both gradients in one pass over the gradient and the input. The forward is ATen's. CUDA tensors use cuDNN
through the reference.
"""
import torch
from torch import Tensor

from accel.ops._library import lib, register_backends
from accel.reference import depthwise_conv2d as reference  # the module, not the function

lib.define(
    "depthwise_conv2d(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> Tensor")
lib.define(
    "depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
    "int[2] dilation, bool[2] output_mask) -> (Tensor, Tensor)")


def _pair(value, name: str, low: int, op: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                                  for v in pair):
        raise ValueError(f"{op}: `{name}` must be an int >= {low} or a pair of them, got {value!r}")
    return pair


def check_geometry(stride, padding, dilation, op: str = "depthwise_conv2d") -> tuple[list[int], list[int], list[int]]:
    """stride, padding and dilation as pairs, stride and dilation >= 1 and padding >= 0."""
    return _pair(stride, "stride", 1, op), _pair(padding, "padding", 0, op), _pair(dilation, "dilation", 1, op)


def depthwise_conv2d(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1) -> Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=C)``, no bias.

    Args:
        x: (N, C, H, W), float32 or float64.
        weight: (C, 1, kh, kw), x's dtype and device.
        stride, padding, dilation: ints or pairs; stride and dilation > 0, padding >= 0.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: `x` must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: `weight` must have shape (C, 1, kh, kw) with C = {x.shape[1]}, the "
                         f"channels of `x`, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"depthwise_conv2d: `x` and `weight` must both be float32 or both float64, got "
                        f"{x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"depthwise_conv2d: `weight` is on {weight.device} but `x` is on {x.device}")
    if x.shape[1] == 0:
        raise ValueError(f"depthwise_conv2d: `x` must have at least one channel, got shape {tuple(x.shape)}")
    stride, padding, dilation = check_geometry(stride, padding, dilation)
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"depthwise_conv2d: `weight` must have a non-empty kernel, got shape {tuple(weight.shape)}")
    if min(output_size(x.shape, weight.shape, stride, padding, dilation)[2:]) < 1:
        raise ValueError(f"depthwise_conv2d: the output would be empty: `weight`'s kernel {tuple(weight.shape[2:])} "
                         f"with dilation {dilation} does not fit in `x`'s {tuple(x.shape[2:])} plus padding {padding}")
    return torch.ops.accel.depthwise_conv2d(x, weight, stride, padding, dilation)


def output_size(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    n, c, h, w = x_shape
    return [n, c, *((size + 2 * p - d * (k - 1) - 1) // s + 1
                    for size, k, s, p, d in zip((h, w), weight_shape[2:], stride, padding, dilation))]


@torch.library.register_fake("accel::depthwise_conv2d")
def _fake(x, weight, stride, padding, dilation):
    return x.new_empty(output_size(x.shape, weight.shape, stride, padding, dilation))


@torch.library.register_fake("accel::depthwise_conv2d_backward")
def _backward_fake(grad, x, weight, stride, padding, dilation, output_mask):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
            torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.accel.depthwise_conv2d_backward(
        grad, x, weight, *ctx.geometry, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
    return grad_x, grad_weight, None, None, None


torch.library.register_autograd("accel::depthwise_conv2d", _backward, setup_context=_setup_context)


def _reference_forward(x, weight, stride, padding, dilation):
    return reference.depthwise_conv2d(x, weight, stride, padding, dilation).contiguous()


def _reference_backward(grad, x, weight, stride, padding, dilation, output_mask):
    with torch.enable_grad():
        x_ = x.detach().requires_grad_()
        w_ = weight.detach().requires_grad_()
        out = reference.depthwise_conv2d(x_, w_, stride, padding, dilation)
        grad_x, grad_w = torch.autograd.grad(out, [x_, w_], grad)
    return (grad_x.contiguous() if output_mask[0] else None, grad_w.contiguous() if output_mask[1] else None)


# No Triton kernel: on CUDA the reference runs cuDNN's depthwise convolution, which is fast there.
register_backends("depthwise_conv2d", _reference_forward)
register_backends("depthwise_conv2d_backward", _reference_backward)
