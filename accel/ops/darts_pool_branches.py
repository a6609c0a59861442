"""accel.ops.darts_pool_branches: the two pooling branches of a stride-1 DARTS edge, fused.

    out = w0 * BN(max_pool_3x3(x)) + w1 * BN(avg_pool_3x3(x))

with DARTS' search-time modules: 3x3 pools at stride 1 and padding 1 (average with count_include_pad=False),
each followed by BatchNorm2d(affine=False) with batch statistics in training (running statistics updated
exactly as torch's BatchNorm2d does) and running statistics in eval. Only x and 2 x C statistics are kept
for backward, instead of both pooled tensors, the max-pool indices and both BN outputs.

Flow: darts_pool_branches (checks) -> torch.ops.accel.darts_pool_branches -> C++ kernel on the CPU
(csrc/cpu/darts_pool_branches.cpp), Triton kernel on CUDA (kernels/darts_pool_branches.py). The backward is
the op accel::darts_pool_branches_backward.
"""
import torch
from torch import Tensor
import torch.nn.functional as F

from accel.ops._checks import check_batch_norm
from accel.ops._library import lib, register_backends, triton_kernel

# Functional, so that autograd and torch.compile see no mutation: the running statistics go in as one (4, C)
# tensor (max mean, max var, avg mean, avg var) and come out updated; the Python op stores them.
lib.define(
    "darts_pool_branches(Tensor x, Tensor weights, Tensor running, bool training, float momentum, float eps) "
    "-> (Tensor, Tensor, Tensor)")
lib.define(
    "darts_pool_branches_backward(Tensor grad, Tensor x, Tensor weights, Tensor stats, bool training, float eps) "
    "-> (Tensor, Tensor)")


def darts_pool_branches(x: Tensor, weights: Tensor, max_bn: torch.nn.BatchNorm2d, avg_bn: torch.nn.BatchNorm2d) -> Tensor:
    """``weights[0] * max_bn(max_pool_3x3(x)) + weights[1] * avg_bn(avg_pool_3x3(x))`` at stride 1.

    Args:
        x: (N, C, H, W) float32.
        weights: shape (2,), the mixing weights of the max-pool and avg-pool branches.
        max_bn, avg_bn: BatchNorm2d(C, affine=False, track_running_stats=True) modules, whose training flag,
            momentum, eps and running statistics are used and updated as the modules themselves would.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype != torch.float32:
        raise ValueError(f"darts_pool_branches: `x` must be a float32 (N, C, H, W) tensor, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weights, Tensor) or weights.shape != (2,) or not weights.is_floating_point():
        raise ValueError(f"darts_pool_branches: `weights` must be a floating tensor of shape (2,), got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    if weights.device != x.device:
        raise ValueError(f"darts_pool_branches: `weights` is on {weights.device} but `x` is on {x.device}")
    for name, bn in (("max_bn", max_bn), ("avg_bn", avg_bn)):
        check_batch_norm("darts_pool_branches", name, bn, x.shape[1], x.device, "BatchNorm2d")
    if max_bn.training != avg_bn.training or max_bn.momentum != avg_bn.momentum or max_bn.eps != avg_bn.eps:
        raise ValueError("darts_pool_branches: `max_bn` and `avg_bn` must share training mode, momentum and eps")
    if max_bn.training and x.numel() <= x.shape[1]:
        raise ValueError(f"darts_pool_branches: `x` must have more than one value per channel in training, got shape "
                         f"{tuple(x.shape)}")
    running = torch.stack([max_bn.running_mean, max_bn.running_var, avg_bn.running_mean, avg_bn.running_var])
    out, _, new_running = torch.ops.accel.darts_pool_branches(
        x, weights, running, max_bn.training, float(max_bn.momentum), float(max_bn.eps))
    if max_bn.training:
        with torch.no_grad():
            for buffer, value in zip((max_bn.running_mean, max_bn.running_var, avg_bn.running_mean,
                                      avg_bn.running_var), new_running):
                buffer.copy_(value)
            max_bn.num_batches_tracked.add_(1)
            avg_bn.num_batches_tracked.add_(1)
    return out


@torch.library.register_fake("accel::darts_pool_branches")
def _fake(x, weights, running, training, momentum, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(4, x.shape[1]),
            torch.empty_like(running, memory_format=torch.contiguous_format))


@torch.library.register_fake("accel::darts_pool_branches_backward")
def _backward_fake(grad, x, weights, stats, training, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    x, weights, _running, training, _momentum, eps = inputs
    ctx.save_for_backward(x, weights, output[1])
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_out, _grad_stats, _grad_running):
    x, weights, stats = ctx.saved_tensors
    grad_x, grad_weights = torch.ops.accel.darts_pool_branches_backward(grad_out, x, weights, stats, ctx.training,
                                                                              ctx.eps)
    return grad_x, grad_weights, None, None, None, None


torch.library.register_autograd("accel::darts_pool_branches", _backward, setup_context=_setup_context)


def _reference_forward(x, weights, running, training, momentum, eps):
    """The op through the functional form of DARTS' modules (fallback kernel)."""
    outs, stats = [], []
    new_running = running.clone()
    for pooled, mean, var in ((F.max_pool2d(x, 3, 1, 1), new_running[0], new_running[1]),
                              (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), new_running[2], new_running[3])):
        if training:
            batch_mean = pooled.mean((0, 2, 3))
            batch_var = pooled.var((0, 2, 3), unbiased=False)
            stats += [batch_mean, torch.rsqrt(batch_var + eps)]
        else:
            stats += [mean.clone(), torch.rsqrt(var + eps)]
        outs.append(F.batch_norm(pooled, mean, var, training=training, momentum=momentum, eps=eps))
    return (weights[0] * outs[0] + weights[1] * outs[1]).contiguous(), torch.stack(stats), new_running


def _reference_backward(grad, x, weights, stats, training, eps):
    with torch.enable_grad():
        x_ = x.detach().requires_grad_()
        w_ = weights.detach().requires_grad_()
        outs = []
        for k, pooled in enumerate((F.max_pool2d(x_, 3, 1, 1), F.avg_pool2d(x_, 3, 1, 1, count_include_pad=False))):
            mean, invstd = stats[2 * k], stats[2 * k + 1]
            if training:  # the batch statistics depend on x
                mean, invstd = pooled.mean((0, 2, 3)), torch.rsqrt(pooled.var((0, 2, 3), unbiased=False) + eps)
            outs.append((pooled - mean[None, :, None, None]) * invstd[None, :, None, None])
        out = w_[0] * outs[0] + w_[1] * outs[1]
        return tuple(t.contiguous() for t in torch.autograd.grad(out, [x_, w_], grad))


register_backends("darts_pool_branches", _reference_forward, triton_kernel("darts_pool_branches", "forward"))
register_backends("darts_pool_branches_backward", _reference_backward, triton_kernel("darts_pool_branches", "backward"))
