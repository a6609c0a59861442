"""accel.ops.batch_norm_mix: the weighted sum of K batch-normalised tensors, fused.

    out = sum_k w_k * BN_k(z_k)

with BatchNorm2d(affine=False) modules BN_k: batch statistics in training (running statistics updated exactly
as torch's BatchNorm2d does), running statistics in eval. In a DARTS edge the z_k are the parametric branches'
outputs before their last BatchNorm: eager PyTorch keeps both z_k and BN_k(z_k) for backward, this op keeps
only the z_k and 2 x K x C statistics.

Flow: batch_norm_mix (checks) -> torch.ops.accel.batch_norm_mix -> C++ kernel on the CPU
(csrc/cpu/batch_norm_mix.cpp), Triton kernel on CUDA (kernels/batch_norm_mix.py). The backward is the op accel::batch_norm_mix_backward.
"""
from collections.abc import Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from accel.ops._checks import check_batch_norm, check_tensor_list
from accel.ops._library import lib, register_backends, triton_kernel

# Functional, so that autograd and torch.compile see no mutation: the running statistics go in as one
# (K, 2, C) tensor (mean, var) and come out updated; the Python op stores them.
lib.define(
    "batch_norm_mix(Tensor[] zs, Tensor weights, Tensor running, bool training, float momentum, float eps) "
    "-> (Tensor, Tensor, Tensor)")
lib.define(
    "batch_norm_mix_backward(Tensor grad, Tensor[] zs, Tensor weights, Tensor stats, bool training, float eps) "
    "-> (Tensor[], Tensor)")

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def batch_norm_mix(zs: Sequence[Tensor], weights: Tensor, norms: Sequence[nn.BatchNorm2d]) -> Tensor:
    """``sum_k weights[k] * norms[k](zs[k])``.

    Args:
        zs: K tensors of one shape (N, C, ...), float32 or float64, on one device.
        weights: shape (K,), the mixing weights.
        norms: K BatchNorm modules with ``affine=False``, running statistics and a momentum, all in the same
            training mode and with the same momentum and eps; their running statistics and
            ``num_batches_tracked`` are updated in training as the modules themselves would.
    """
    zs = list(zs)
    norms = list(norms)
    _check(zs, weights, norms)
    bn0 = norms[0]
    running = torch.stack([torch.stack([bn.running_mean, bn.running_var]) for bn in norms])
    out, _, new_running = torch.ops.accel.batch_norm_mix(zs, weights, running, bn0.training, float(bn0.momentum),
                                                         float(bn0.eps))
    if bn0.training:
        with torch.no_grad():
            for bn, (mean, var) in zip(norms, new_running):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.add_(1)
    return out


def _check(zs: list, weights, norms: list) -> None:
    z0 = check_tensor_list("batch_norm_mix", "zs", zs, SUPPORTED_DTYPES)
    if z0.dim() < 2:
        raise ValueError(f"batch_norm_mix: `zs[0]` must have shape (N, C, ...), got {tuple(z0.shape)}")
    if not isinstance(weights, Tensor) or weights.shape != (len(zs),) or not weights.is_floating_point():
        raise ValueError(f"batch_norm_mix: `weights` must be a floating tensor of shape ({len(zs)},), got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    if weights.device != z0.device:
        raise ValueError(f"batch_norm_mix: `weights` is on {weights.device} but `zs` are on {z0.device}")
    if len(norms) != len(zs):
        raise ValueError(f"batch_norm_mix: `norms` must hold one BatchNorm per tensor, {len(zs)}, got {len(norms)}")
    C = z0.shape[1]
    for k, bn in enumerate(norms):
        check_batch_norm("batch_norm_mix", f"norms[{k}]", bn, C, z0.device)
        if (bn.training, bn.momentum, bn.eps) != (norms[0].training, norms[0].momentum, norms[0].eps):
            raise ValueError("batch_norm_mix: `norms` must share training mode, momentum and eps")
    if norms[0].training and z0.numel() <= C:
        raise ValueError(f"batch_norm_mix: `zs` must have more than one value per channel in training, got shape "
                         f"{tuple(z0.shape)}")


@torch.library.register_fake("accel::batch_norm_mix")
def _fake(zs, weights, running, training, momentum, eps):
    z0 = zs[0]
    return (torch.empty_like(z0, memory_format=torch.contiguous_format), z0.new_empty(len(zs), 2, z0.shape[1]),
            torch.empty_like(running, memory_format=torch.contiguous_format))


@torch.library.register_fake("accel::batch_norm_mix_backward")
def _backward_fake(grad, zs, weights, stats, training, eps):
    return [torch.empty_like(z, memory_format=torch.contiguous_format) for z in zs], torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    zs, weights, _running, training, _momentum, eps = inputs
    ctx.save_for_backward(*zs, weights, output[1])
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_out, _grad_stats, _grad_running):
    *zs, weights, stats = ctx.saved_tensors
    grad_zs, grad_weights = torch.ops.accel.batch_norm_mix_backward(grad_out, zs, weights, stats, ctx.training,
                                                                    ctx.eps)
    return grad_zs, grad_weights, None, None, None, None


torch.library.register_autograd("accel::batch_norm_mix", _backward, setup_context=_setup_context)


def _reference_forward(zs, weights, running, training, momentum, eps):
    """The op through F.batch_norm, as DARTS' modules compute it (fallback kernel)."""
    out, stats = 0, []
    new_running = running.clone()
    dims = [0] + list(range(2, zs[0].dim()))
    for k, z in enumerate(zs):
        mean, var = new_running[k]
        if training:
            stats.append(torch.stack([z.mean(dims), torch.rsqrt(z.var(dims, unbiased=False) + eps)]))
        else:
            stats.append(torch.stack([mean.clone(), torch.rsqrt(var + eps)]))
        out = out + weights[k] * F.batch_norm(z, mean, var, training=training, momentum=momentum, eps=eps)
    return out.contiguous(), torch.stack(stats), new_running


def _reference_backward(grad, zs, weights, stats, training, eps):
    with torch.enable_grad():
        zs_ = [z.detach().requires_grad_() for z in zs]
        w_ = weights.detach().requires_grad_()
        shape = [1, -1] + [1] * (zs[0].dim() - 2)
        out = 0
        dims = [0] + list(range(2, zs[0].dim()))
        for k, z in enumerate(zs_):
            mean, invstd = stats[k]
            if training:  # the batch statistics depend on z
                mean, invstd = z.mean(dims), torch.rsqrt(z.var(dims, unbiased=False) + eps)
            out = out + w_[k] * (z - mean.view(shape)) * invstd.view(shape)
        *grad_zs, grad_w = torch.autograd.grad(out, [*zs_, w_], grad)
    return [g.contiguous() for g in grad_zs], grad_w


register_backends("batch_norm_mix", _reference_forward, triton_kernel("batch_norm_mix", "forward"))
register_backends("batch_norm_mix_backward", _reference_backward, triton_kernel("batch_norm_mix", "backward"))
