"""accel.ops.rk_finalize: the end of an adaptive Runge-Kutta step, per sample, in one pass over y0, y1 and the
stages: Hairer's error norm and the stiffness estimate (accel.reference.ode.error_norm and .stiffness).

Flow: rk_finalize (checks) -> torch.ops.accel.rk_finalize -> C++ kernel on the CPU (csrc/cpu/rk_finalize.cpp), the
reference elsewhere. The backward is the op accel::rk_finalize_backward, gradients of both outputs w.r.t. y0, y1,
k, g_prev and h (for regularizers that penalise the error and stiffness estimates). The solver calls this once
per step, so the checks below are attribute comparisons only: no host syncs, no copies.
"""
import math

import torch
from torch import Tensor

from accel.ops._checks import CHECK_ERRORS, check_coefficients, check_tolerances, not_a_tensor
from accel.ops._library import eager_autograd, lib, register_backends, triton_kernel
from accel.reference import ode as reference

lib.define("rk_finalize(Tensor y0, Tensor y1, Tensor k, Tensor g_prev, Tensor h, float[] b_err, float rtol, "
           "float atol) -> (Tensor, Tensor)")
lib.define("rk_finalize_backward(Tensor grad_norm, Tensor grad_rho, Tensor y0, Tensor y1, Tensor k, Tensor g_prev, "
           "Tensor h, float[] b_err, float rtol, float atol) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")

_op = torch.ops.accel.rk_finalize.default
_F32, _F64 = torch.float32, torch.float64
_isfinite = math.isfinite
_REAL = (float, int)  # rtol and atol: Python numbers (a tensor would cost a host sync to read)


def rk_finalize(y0: Tensor, y1: Tensor, k: Tensor, g_prev: Tensor, h: Tensor, b_err, rtol: float,
                atol: float) -> tuple[Tensor, Tensor]:
    """(error_norm (B,), stiffness (B,)) of a step of an s-stage method, per sample:

    - ``error_norm = sqrt(mean_d (err / (atol + rtol * max(|y0|, |y1|)))^2)`` with ``err = h * sum_i b_err[i] k[i]``
      (Hairer's norm; the step is accepted when it is <= 1);
    - ``stiffness = ||k[s-1] - k[s-2]|| / ||y1 - g_prev||`` (Euclidean over D; 0 where the denominator is 0),
      which estimates the dominant eigenvalue's modulus |lambda| of the Jacobian.

    Args:
        y0: (B, D) the state at the start of the step, float32 or float64.
        y1: (B, D) the solution at its end, which is also the last stage's input (FSAL: k[s-1] = f(y1)).
        k: (s, B, D) the stages, s >= 2.
        g_prev: (B, D) the input of stage s-2 (k[s-2] = f(g_prev)).
        h: (B,) per-sample step sizes.
        b_err: s floats, the error estimate's weights b - b_hat.
        rtol, atol: Python floats, finite and >= 0, not both 0.

    All tensors share y0's dtype and device. Differentiable in y0, y1, k, g_prev and h (a sample whose norm or
    whose stiffness denominator is 0 gets a zero gradient from that output).
    """
    # One combined test of everything on the fast path; _explain finds what failed.
    try:
        (B, D), (s, Bk, Dk), (Bh,) = y0.shape, k.shape, h.shape
        dtype, device = y0.dtype, y0.device
        ok = (Bk == B and Dk == D and Bh == B and s >= 2 and y1.shape == y0.shape and g_prev.shape == y0.shape
              and (dtype is _F32 or dtype is _F64) and y1.dtype is dtype and k.dtype is dtype
              and g_prev.dtype is dtype and h.dtype is dtype and y1.device == device and k.device == device
              and g_prev.device == device and h.device == device and isinstance(b_err, (list, tuple))
              and len(b_err) == s and isinstance(rtol, _REAL) and isinstance(atol, _REAL) and _isfinite(rtol)
              and _isfinite(atol) and rtol >= 0 and atol >= 0 and (rtol > 0 or atol > 0))
    except CHECK_ERRORS:
        ok = False
    if not ok:
        _explain(y0, y1, k, g_prev, h, b_err, rtol, atol)
    rtol, atol = float(rtol), float(atol)
    needs_grad = y0.requires_grad or y1.requires_grad or k.requires_grad or g_prev.requires_grad or h.requires_grad
    try:
        return _call(needs_grad, y0, y1, k, g_prev, h, b_err, rtol, atol)
    except (TypeError, RuntimeError):  # the schema's float[] refuses an element of b_err with a RuntimeError
        check_coefficients("rk_finalize", "b_err", b_err)
        raise


def _explain(y0, y1, k, g_prev, h, b_err, rtol, atol):
    """Raises the error that names what rk_finalize's combined check found wrong."""
    not_a_tensor("rk_finalize", y0=y0, y1=y1, k=k, g_prev=g_prev, h=h)
    shape = y0.shape
    if y0.dim() != 2:
        raise ValueError(f"rk_finalize: `y0` must have shape (B, D), got {tuple(shape)}")
    if y1.shape != shape:
        raise ValueError(f"rk_finalize: `y1` must have `y0`'s shape {tuple(shape)}, got {tuple(y1.shape)}")
    if g_prev.shape != shape:
        raise ValueError(f"rk_finalize: `g_prev` must have `y0`'s shape {tuple(shape)}, got {tuple(g_prev.shape)}")
    if k.dim() != 3 or k.shape[1:] != shape or k.shape[0] < 2:
        raise ValueError(f"rk_finalize: `k` must have shape (s, B, D) = (s >= 2, {shape[0]}, {shape[1]}), got "
                         f"{tuple(k.shape)}")
    if h.shape != shape[:1]:
        raise ValueError(f"rk_finalize: `h` must have shape (B,) = ({shape[0]},), got {tuple(h.shape)}")
    dtype, device = y0.dtype, y0.device
    if dtype not in (_F32, _F64) or any(t.dtype != dtype for t in (y1, k, g_prev, h)):
        raise TypeError(f"rk_finalize: `y0`, `y1`, `k`, `g_prev` and `h` must all be float32 or all float64, got "
                        f"{y0.dtype}, {y1.dtype}, {k.dtype}, {g_prev.dtype} and {h.dtype}")
    if any(t.device != device for t in (y1, k, g_prev, h)):
        raise ValueError(f"rk_finalize: `y1`, `k`, `g_prev` and `h` must be on `y0`'s device {device}, got "
                         f"{y1.device}, {k.device}, {g_prev.device} and {h.device}")
    if not isinstance(b_err, (list, tuple)) or len(b_err) != k.shape[0]:
        raise ValueError(f"rk_finalize: `b_err` must be a list of {k.shape[0]} floats (one per stage of `k`), got "
                         f"{b_err!r}")
    check_tolerances("rk_finalize", rtol, atol)
    raise ValueError("rk_finalize: invalid arguments")  # not reached


@torch.library.register_fake("accel::rk_finalize")
def _fake(y0, y1, k, g_prev, h, b_err, rtol, atol):
    return y0.new_empty(y0.shape[:1]), y0.new_empty(y0.shape[:1])


@torch.library.register_fake("accel::rk_finalize_backward")
def _backward_fake(grad_norm, grad_rho, y0, y1, k, g_prev, h, b_err, rtol, atol):
    return y0.new_empty(y0.shape), y0.new_empty(y0.shape), k.new_empty(k.shape), y0.new_empty(y0.shape), \
        h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    y0, y1, k, g_prev, h, b_err, rtol, atol = inputs
    ctx.save_for_backward(y0, y1, k, g_prev, h)
    ctx.constants = (b_err, rtol, atol)


def _backward(ctx, grad_norm, grad_rho):
    if not any(ctx.needs_input_grad[:5]):
        return (None,) * 8
    grads = torch.ops.accel.rk_finalize_backward(grad_norm, grad_rho, *ctx.saved_tensors, *ctx.constants)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None)


torch.library.register_autograd("accel::rk_finalize", _backward, setup_context=_setup_context)


_call = eager_autograd(_op, _setup_context, _backward)


def _reference(y0, y1, k, g_prev, h, b_err, rtol, atol):
    """The two outputs by accel.reference.ode, with the error norm's gradient at 0 taken as 0."""
    err = h[:, None] * reference.combination(k, b_err)
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    ms = (err / scale).pow(2).mean(-1)
    norm = torch.where(ms != 0, torch.where(ms != 0, ms, 1.0).sqrt(), torch.zeros_like(ms))  # error_norm, safe at 0
    return norm, reference.stiffness(k, torch.stack([g_prev, y1]))


def _reference_forward(y0, y1, k, g_prev, h, b_err, rtol, atol):
    with torch.no_grad():
        err = h[:, None] * reference.combination(k, b_err)
        return (reference.error_norm(err, y0, y1, rtol, atol).contiguous(),
                reference.stiffness(k, torch.stack([g_prev, y1])).contiguous())


def _reference_backward(grad_norm, grad_rho, y0, y1, k, g_prev, h, b_err, rtol, atol):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (y0, y1, k, g_prev, h)]
        outputs = _reference(*leaves, b_err, rtol, atol)
        grads = torch.autograd.grad(outputs, leaves, (grad_norm, grad_rho), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, leaves))


register_backends("rk_finalize", _reference_forward, triton_kernel("rk_finalize", "forward"))
register_backends("rk_finalize_backward", _reference_backward, triton_kernel("rk_finalize", "backward"))
