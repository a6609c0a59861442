"""Gradients with respect to the output times, from the ODE itself: d y(t_i) / d t_i = f(t_i, y(t_i)) and
d y(t_i) / d t0 = -(d y(t_i) / d y0) f(t0, y0). Both are attached as terms whose value is zero and whose derivative is
that: the second by moving the initial state the solver starts from (so the solver's own derivative carries it
through), the first on the outputs. Rows (R, N): the whole state as one row, or one row per sample."""
import torch
from torch import Tensor


def shifted_initial_state(y0: Tensor, t0: Tensor, f0: Tensor) -> Tensor:
    """y0 - (t0 - t0) f0, for t0 one time (0-d) or one per row (R,), f0 = f(t0, y0) (R, N)."""
    return y0 - _zero(t0).reshape(-1, 1) * f0


def with_output_terms(y0: Tensor, ys: Tensor, t: Tensor, fs: Tensor) -> Tensor:
    """The solution (T, R, N) with y(t0) = y0 itself and ys[i] + (t_i - t_i) f(t_i, ys[i]) after it, for times t
    (T, R) (or (T, 1) for all rows) and fs (T - 1, R, N) the derivatives at the later ones."""
    return torch.cat([y0[None], ys[1:] + _zero(t[1:])[..., None] * fs])


def _zero(t: Tensor) -> Tensor:
    return t - t.detach()
