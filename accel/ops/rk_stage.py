"""accel.ops.rk_stage: one Runge-Kutta stage input, g = y0 + h[:, None] * sum_j a[j] k[j], in one pass.

Flow: rk_stage (checks) -> torch.ops.accel.rk_stage -> C++ kernel on the CPU (csrc/cpu/rk_stage.cpp), the
reference formula elsewhere. The backward is the op accel::rk_stage_backward (grad_k, grad_h); grad_y0 is the
incoming gradient itself. The adaptive solver (accel.ode) calls this once per stage, about 8 times per step at
small sizes, so the checks below are attribute comparisons only: no host syncs, no copies.
"""
import torch
from torch import Tensor

from accel.ops._checks import CHECK_ERRORS, check_coefficients, not_a_tensor
from accel.ops._library import eager_autograd, lib, register_backends, triton_kernel
from accel.reference import ode as reference


lib.define("rk_stage(Tensor y0, Tensor k, Tensor h, float[] a) -> Tensor")
lib.define("rk_stage_backward(Tensor grad, Tensor k, Tensor h, float[] a) -> (Tensor, Tensor)")

_op = torch.ops.accel.rk_stage.default
_F32, _F64 = torch.float32, torch.float64


def rk_stage(y0: Tensor, k: Tensor, h: Tensor, a) -> Tensor:
    """g (B, D) with ``g = y0 + h[:, None] * sum_{j < len(a)} a[j] * k[j]``: the input of a Runge-Kutta stage.

    Args:
        y0: (B, D) state at the start of the step, float32 or float64.
        k: (s, B, D) the stage buffer; only its first len(a) stages are read (and none whose coefficient is 0).
        h: (B,) per-sample step sizes.
        a: a row of the Butcher tableau, a list (or tuple) of Python floats, len(a) <= s. Empty: a copy of y0.

    All tensors share y0's dtype and device. Differentiable in y0, k and h. Non-contiguous inputs are copied.
    """
    # One combined test of everything on the fast path (about 1 us); _explain finds what failed.
    try:
        (B, D), (s, Bk, Dk), (Bh,) = y0.shape, k.shape, h.shape
        dtype, device = y0.dtype, y0.device
        ok = (Bk == B and Dk == D and Bh == B and (dtype is _F32 or dtype is _F64) and k.dtype is dtype
              and h.dtype is dtype and k.device == device and h.device == device and isinstance(a, (list, tuple))
              and len(a) <= s)
    except CHECK_ERRORS:
        ok = False
    if not ok:
        _explain(y0, k, h, a)
    try:
        return _call(y0.requires_grad or k.requires_grad or h.requires_grad, y0, k, h, a)
    except (TypeError, RuntimeError):  # the schema's float[] refuses an element of a with a RuntimeError
        check_coefficients("rk_stage", "a", a)
        raise


def _explain(y0, k, h, a):
    """Raises the error that names what rk_stage's combined check found wrong."""
    not_a_tensor("rk_stage", y0=y0, k=k, h=h)
    if y0.dim() != 2:
        raise ValueError(f"rk_stage: `y0` must have shape (B, D), got {tuple(y0.shape)}")
    B, D = y0.shape
    if k.dim() != 3 or k.shape[1:] != y0.shape:
        raise ValueError(f"rk_stage: `k` must have shape (s, B, D) = (s, {B}, {D}), got {tuple(k.shape)}")
    if h.shape != y0.shape[:1]:
        raise ValueError(f"rk_stage: `h` must have shape (B,) = ({B},), got {tuple(h.shape)}")
    if y0.dtype not in (_F32, _F64) or k.dtype != y0.dtype or h.dtype != y0.dtype:
        raise TypeError(f"rk_stage: `y0`, `k` and `h` must all be float32 or all float64, got {y0.dtype}, {k.dtype} "
                        f"and {h.dtype}")
    if k.device != y0.device or h.device != y0.device:
        raise ValueError(f"rk_stage: `k` and `h` must be on `y0`'s device {y0.device}, got {k.device} and {h.device}")
    if not isinstance(a, (list, tuple)):
        raise TypeError(f"rk_stage: `a` must be a list of floats, got {type(a).__name__}")
    if len(a) > k.shape[0]:
        raise ValueError(f"rk_stage: `a` has {len(a)} coefficients but `k` only {k.shape[0]} stages")
    raise ValueError("rk_stage: invalid arguments")  # not reached


@torch.library.register_fake("accel::rk_stage")
def _fake(y0, k, h, a):
    return y0.new_empty(y0.shape)


@torch.library.register_fake("accel::rk_stage_backward")
def _backward_fake(grad, k, h, a):
    return k.new_empty(k.shape), h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    y0, k, h, a = inputs
    # k is read only by h's gradient: without it, a solver may write the next stage into the same buffer
    ctx.save_for_backward(k if ctx.needs_input_grad[2] else None, h)
    ctx.a, ctx.k_shape = a, k.shape


def _backward(ctx, grad):
    k, h = ctx.saved_tensors
    grad_k = grad_h = None
    if ctx.needs_input_grad[2]:
        grad_k, grad_h = torch.ops.accel.rk_stage_backward(grad, k, h, ctx.a)
    elif ctx.needs_input_grad[1]:  # grad_k[j] = a[j] h grad
        a = list(ctx.a) + [0.0] * (ctx.k_shape[0] - len(ctx.a))
        grad_k = grad.new_tensor(a)[:, None, None] * (h[:, None] * grad)
    return grad if ctx.needs_input_grad[0] else None, grad_k, grad_h, None


torch.library.register_autograd("accel::rk_stage", _backward, setup_context=_setup_context)


_call = eager_autograd(_op, _setup_context, _backward)


def _reference_forward(y0, k, h, a):
    # accel.reference.ode.rk_step's g_i = y + h sum_j a_ij k_j
    return (y0 + h[:, None] * reference.combination(k, a)).contiguous()


def _reference_backward(grad, k, h, a):
    grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
    for j, aj in enumerate(a):
        if aj != 0.0:
            grad_k[j] = aj * h[:, None] * grad
    grad_h = (grad * reference.combination(k, a)).sum(-1)
    return grad_k, grad_h


register_backends("rk_stage", _reference_forward, triton_kernel("rk_stage", "forward"))
register_backends("rk_stage_backward", _reference_backward, triton_kernel("rk_stage", "backward"))
