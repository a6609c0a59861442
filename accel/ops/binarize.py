"""accel.ops.binarize: sign(x) in the forward (0 maps to +1), and in the backward one of the estimators that
train binary networks through it (accel/reference/binary.py): the straight-through estimator "ste", the
clipped one "clipped", and ReSTE "reste" with its power o, threshold t and interval delta.

Flow: binarize (checks) -> torch.ops.accel.binarize, whose backward is the op accel::binarize_backward; both are
elementwise PyTorch kernels for every device (one pass each: nothing to fuse below them).
"""
import math

import torch
from torch import Tensor

from accel.ops._library import lib
from accel.reference import binary as reference

lib.define("binarize(Tensor x, str estimator, float o, float t, float delta) -> Tensor")
lib.define("binarize_backward(Tensor grad, Tensor x, str estimator, float o, float t, float delta) -> Tensor")

ESTIMATORS = ("ste", "clipped", "reste")


def binarize(x: Tensor, estimator: str = "reste", *, o: float = 1.0, t: float = 1.5, delta: float = 0.1) -> Tensor:
    """+1 where x >= 0, -1 where x < 0, differentiable through ``estimator``:

    - "ste": the gradient passes unchanged;
    - "clipped": it passes where |x| <= 1;
    - "reste": times (1/o) |x|^(1/o - 1) where delta < |x| <= t, delta^(1/o - 1) where |x| <= delta, 0 beyond t
      (o >= 1: 1 is the clipped STE at t; accel.reference.binary.reste_power gives the paper's schedule).
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError("binarize: `x` must be a floating-point tensor")
    if estimator not in ESTIMATORS:
        raise ValueError(f"binarize: `estimator` must be one of {ESTIMATORS}, got {estimator!r}")
    for name, value, low in (("o", o, 1.0), ("t", t, 0.0), ("delta", delta, 0.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (name != "o" and value == 0):
            raise ValueError(f"binarize: `{name}` must be a finite number " + (">= 1" if name == "o" else "> 0") +
                             f", got {value!r}")
    if estimator == "reste" and delta >= t:
        raise ValueError(f"binarize: `delta` ({delta}) must be below `t` ({t})")
    return torch.ops.accel.binarize(x, estimator, float(o), float(t), float(delta))


def _forward(x, estimator, o, t, delta):
    return reference.sign(x)


def _backward(grad, x, estimator, o, t, delta):
    if estimator == "ste":
        return grad.clone()
    if estimator == "clipped":
        return grad * reference.clipped_ste_grad(x)
    return grad * reference.reste_grad(x, o, t, delta)


lib.impl("binarize", _forward, "CompositeExplicitAutograd")
lib.impl("binarize_backward", _backward, "CompositeExplicitAutograd")


@torch.library.register_fake("accel::binarize")
def _fake(x, estimator, o, t, delta):
    return torch.empty_like(x)


@torch.library.register_fake("accel::binarize_backward")
def _backward_fake(grad, x, estimator, o, t, delta):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, ctx.estimator, ctx.o, ctx.t, ctx.delta = inputs
    ctx.save_for_backward(x)


def _autograd_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.accel.binarize_backward(grad, x, ctx.estimator, ctx.o, ctx.t, ctx.delta), None, None, None, None


torch.library.register_autograd("accel::binarize", _autograd_backward, setup_context=_setup_context)
