"""accel.ops.mixed_op: the DARTS mixed-op weighted sum out = sum_k w_k y_k, fused.

Flow: mixed_op (checks) -> torch.ops.accel.mixed_op -> C++ kernel on the CPU (csrc/cpu/mixed_op.cpp),
Triton kernel on CUDA (kernels/mixed_op.py). The backward is the op accel::mixed_op_backward.
"""
from collections.abc import Sequence
import math

import torch
from torch import Tensor

from accel.ops._checks import check_tensor_list
from accel.ops._library import lib, register_backends, triton_kernel
from accel.reference import mixed_op as reference  # the module, not the function

lib.define("mixed_op(Tensor[] ys, Tensor weights, float? tau) -> Tensor")
lib.define("mixed_op_backward(Tensor grad, Tensor[] ys, Tensor weights, float? tau) -> (Tensor[], Tensor)")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def mixed_op(ys: Sequence[Tensor] | Tensor, weights: Tensor | None = None, *, alpha: Tensor | None = None,
             tau: float = 1.0) -> Tensor:
    """Mixes K candidate outputs of a DARTS edge: ``out = sum_k w_k * ys[k]``.

    Args:
        ys: K tensors of one shape, dtype (float32, float64, bfloat16) and device, or one tensor whose
            first dimension is K.
        weights: the mixing weights w, shape (K,), used as given (DARTS' ``MixedOp.forward(x, weights)``).
        alpha: architecture logits, shape (K,); then ``w = softmax(alpha / tau)``. Give exactly one of
            ``weights`` and ``alpha``.
        tau: softmax temperature, finite and > 0 (only with ``alpha``).

    A weight that is exactly 0 switches its branch off: it adds nothing and gets zero gradients, its weight included. The compiled kernels do
    not even read its tensor, with no host sync.

    Memory: the backward keeps only the inputs (which the branches keep anyway), not the K products.
    """
    if (weights is None) == (alpha is None):
        raise ValueError("mixed_op: give exactly one of `weights` (used as given) and `alpha` (softmax logits)")
    if isinstance(ys, Tensor):
        if ys.dim() < 1:
            raise ValueError(f"mixed_op: `ys` as one tensor must have a leading K dimension, got shape {tuple(ys.shape)}")
        ys = ys.unbind(0)
    ys = list(ys)
    mix = weights if weights is not None else alpha
    name = "weights" if weights is not None else "alpha"
    _check(ys, mix, name)
    if alpha is None:
        return torch.ops.accel.mixed_op(ys, weights, None)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"mixed_op: `tau` must be a finite number > 0, got {tau!r}")
    return torch.ops.accel.mixed_op(ys, alpha, float(tau))


def _check(ys: list, mix, name: str) -> None:
    y0 = check_tensor_list("mixed_op", "ys", ys, SUPPORTED_DTYPES)
    if not isinstance(mix, Tensor):
        raise TypeError(f"mixed_op: `{name}` must be a Tensor, got {type(mix).__name__}")
    if mix.dim() != 1 or mix.shape[0] != len(ys):
        raise ValueError(f"mixed_op: `{name}` must have shape (K,) = ({len(ys)},), got {tuple(mix.shape)}")
    if not mix.is_floating_point():
        raise TypeError(f"mixed_op: `{name}` must be floating point, got {mix.dtype}")
    if mix.device != y0.device:
        raise ValueError(f"mixed_op: `{name}` is on {mix.device} but `ys` are on {y0.device}")


def kernel_strides(y0: Tensor) -> tuple[int, ...]:
    """The layout the kernels compute in: that of empty_like(ys[0]) (ys[0]'s own when it is dense)."""
    return torch.empty_like(y0, device="meta").stride()


@torch.library.register_fake("accel::mixed_op")
def _mixed_op_fake(ys, weights, tau=None):
    return ys[0].new_empty_strided(ys[0].shape, kernel_strides(ys[0]))


@torch.library.register_fake("accel::mixed_op_backward")
def _mixed_op_backward_fake(grad, ys, weights, tau=None):
    strides = kernel_strides(ys[0])
    return [y.new_empty_strided(y.shape, strides) for y in ys], torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    ys, weights, tau = inputs
    ctx.save_for_backward(*ys, weights)
    ctx.tau = tau


def _backward(ctx, grad):
    *ys, weights = ctx.saved_tensors
    grad_ys, grad_weights = torch.ops.accel.mixed_op_backward(grad, ys, weights, ctx.tau)
    return grad_ys, grad_weights, None


torch.library.register_autograd("accel::mixed_op", _backward, setup_context=_setup_context)


# Fallbacks through the reference (no C++ extension on the CPU, no Triton on CUDA).
def _reference_forward(ys, weights, tau=None):
    with torch.no_grad():
        out = reference.mixed_op(ys, weights, tau)
    return out.new_empty_strided(out.shape, kernel_strides(ys[0])).copy_(out)


def _reference_backward(grad, ys, weights, tau=None):
    with torch.enable_grad():
        ys_ = [y.detach().requires_grad_() for y in ys]
        w_ = weights.detach().requires_grad_()
        out = reference.mixed_op(ys_, w_, tau)
        grads = torch.autograd.grad(out, [*ys_, w_], grad, allow_unused=True, materialize_grads=True)
    strides = kernel_strides(ys[0])
    grad_ys = [y.new_empty_strided(y.shape, strides).copy_(gy) for y, gy in zip(ys, grads)]
    return grad_ys, grads[-1]


register_backends("mixed_op", _reference_forward, triton_kernel("mixed_op", "forward"))
register_backends("mixed_op_backward", _reference_backward, triton_kernel("mixed_op", "backward"))
