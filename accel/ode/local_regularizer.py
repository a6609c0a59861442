"""accel.ode.local_regularizer: the local variant of the solver-heuristic regularizers ("Locally Regularized
Neural Differential Equations"): instead of accumulating the error or stiffness estimate over every step of the
solve (accel.odeint's `regularization`), take one step from one point of the trajectory and penalise its
estimate. It works with any way of differentiating the solve, since it is a separate, small graph.

Unbiased: a time drawn uniformly from the span and the trajectory's state there (an extra output time of the
solve); biased: a time the solver stepped from. Either way the caller passes the state; this takes the step.
"""
import torch
from torch import Tensor

from accel.ops._checks import check_tolerances, not_a_tensor
from accel.ops.rk_finalize import rk_finalize
from accel.ops.rk_stage import rk_stage
from accel.reference.ode import METHODS, initial_step


def local_regularizer(func, t: Tensor, y: Tensor, h: Tensor | None = None, method: str = "dopri5",
                      kind: str = "error", rtol: float = 1e-6, atol: float = 1e-8) -> Tensor:
    """One step of ``method`` from (t, y) per sample, and its error norm (kind 'error') or |h rho| / the
    method's stability bound ('stiffness'): (B,), differentiable w.r.t. y and func's parameters.

    Args:
        func: func(t, y) as for accel.odeint with per_sample=True: t the (B, 1) times, y (B, D).
        t: (B,) times, y: (B, D) states on the trajectory there.
        h: (B,) step sizes; None: Hairer's starting step for (t, y) (treated as a constant).
        method: an adaptive method of accel.odeint (dopri5, tsit5, bosh3; 'stiffness' needs dopri5 or tsit5).
    """
    op = "local_regularizer"
    if not callable(func):
        raise TypeError(f"{op}: `func` must be callable as func(t, y), got {type(func).__name__}")
    if not isinstance(method, str) or method not in METHODS or METHODS[method].error_order == 0:
        raise ValueError(f"{op}: `method` must be an adaptive method, got {method!r}")
    tableau = METHODS[method]
    if kind not in ("error", "stiffness"):
        raise ValueError(f"{op}: `kind` must be 'error' or 'stiffness', got {kind!r}")
    if kind == "stiffness" and tableau.stability_bound is None:
        raise ValueError(f"{op}: `kind` 'stiffness' needs a stability bound, which method {method!r} has not")
    not_a_tensor(op, t=t, y=y)
    if y.dim() != 2 or y.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: `y` must be a float32 or float64 (B, D) tensor, got {y.dtype} {tuple(y.shape)}")
    if t.shape != y.shape[:1] or t.device != y.device:
        raise ValueError(f"{op}: `t` must have shape (B,) = ({y.shape[0]},) on `y`'s device {y.device}, got "
                         f"{tuple(t.shape)} on {t.device}")
    check_tolerances(op, rtol, atol)
    f = lambda times, state: func(times[:, None], state)  # noqa: E731
    k0 = f(t, y)
    if h is None:
        with torch.no_grad():
            h = initial_step(f, t, y.detach(), k0.detach(), tableau.error_order, rtol, atol)
    k, g = [k0], [y]
    for i, row in enumerate(tableau.a[1:], start=1):
        g.append(rk_stage(y, torch.stack(k), h, list(row)))
        k.append(f(t + tableau.c[i] * h, g[-1]))
    # FSAL tableaus: the last stage's input is y1
    norm, rho = rk_finalize(y, g[-1], torch.stack(k), g[-2], h, list(tableau.b_err), rtol, atol)
    return norm if kind == "error" else (h * rho).abs() / tableau.stability_bound
