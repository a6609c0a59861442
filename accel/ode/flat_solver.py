"""accel.odeint's default solve: the whole state is one vector (B' = 1 row of N components), stepped under
torchdiffeq's rules.

Adaptive methods (dopri5, tsit5, bosh3, adaptive_heun, fehlberg2): the first step by Hairer's rule (II.4), one error ratio
norm(err / (atol + rtol max(|y0|, |y1|))) for the whole state, a step accepted when the ratio is <= 1 (or the step
is at min_step), the next step h * min(ifactor, max(safety ratio^(-1/order), dfactor)) with dfactor raised to 1
after an acceptance (an accepted step never shrinks the next), steps clamped to [min_step, max_step]; steps are not
shortened to the output times, which get the step's quartic interpolant (accel.reference.ode's
quartic_through_midpoint); they are shortened to end on the times of ``step_t`` and ``jump_t`` (after a jump the
derivative is evaluated again, just after it).
Fixed-step methods (euler, midpoint, heun2, heun3, rk4): the grid of ``step_size`` from t[0] (its last point moved
to t[-1]), or the output times themselves; outputs between grid points are interpolated linearly, or by the cubic
Hermite polynomial with ``interp='cubic'``.

The step control runs on Python floats (the whole state has one step size): one error ratio is read back per
step. Every tensor operation is an autograd-recorded op, so with grad enabled the solve is an autograd graph
through the accepted steps' stages (backpropagation through the solver: step sizes and accept/reject decisions
are constants of the backward). Rejected steps are dropped and freed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from accel.reference.ode import Tableau


class FlatSolver:
    """One solve. ``func(t, y, nudge)`` takes a Python float time, the state (1, N) and a direction (-1, 0, 1) in
    which to move t by one unit in the last place (torchdiffeq's ``perturb``, so a discontinuity at a step's end
    is seen from inside the step), and returns dy/dt (1, N); ``norm`` maps err / tol (1, N) to the error ratio,
    None for the RMS over the state. ``grid``: a function of the output times giving the fixed-step grid.
    ``callbacks``: (on every step, on acceptance, on rejection), each called with (t, y, h) or None."""

    def __init__(self, func, tableau: Tableau, rtol: float, atol: float, norm=None, *, first_step=None,
                 step_size=None, safety=0.9, ifactor=10.0, dfactor=0.2, min_step=0.0, max_step=math.inf,
                 max_num_steps=2 ** 31 - 1, step_t=(), jump_t=(), interp="linear", perturb=False, grid=None,
                 callbacks=(None, None, None)):
        self.func, self.tableau, self.rtol, self.atol, self.norm = func, tableau, rtol, atol, norm
        self.first_step, self.step_size = first_step, step_size
        self.safety, self.ifactor, self.dfactor = safety, ifactor, dfactor
        self.min_step, self.max_step, self.max_num_steps = min_step, max_step, max_num_steps
        self.step_t, self.jump_t = sorted(step_t), sorted(jump_t)
        self.interp, self.perturb, self.grid = interp, perturb, grid
        self.on_step, self.on_accept, self.on_reject = (c or _ignore for c in callbacks)
        self.rows = [list(row) for row in tableau.a[1:]]
        self.b, self.b_err = list(tableau.b), list(tableau.b_err)
        self.nfe = self.accepted = self.rejected = 0

    def f(self, t: float, y: Tensor, nudge: int = 0) -> Tensor:
        self.nfe += 1
        return self.func(t, y, nudge)

    # -- one step --------------------------------------------------------------------------------------------------

    def stages(self, t, y, k0, h, t1):
        """The stages of a step of size h from (t, y) with k0 = f(t, y): (y1, the stages, a list). A stage at c = 1
        is evaluated just before t1."""
        tab = self.tableau
        k = [k0]
        g = y
        for i, row in enumerate(self.rows, start=1):
            g = _combine(y, k, h, row)
            c = tab.c[i]
            k.append(self.f(t1, g, -1) if c == 1.0 else self.f(t + c * h, g))
        return (g if tab.fsal else _combine(y, k, h, self.b)), k

    def error_ratio(self, y, y1, k, h) -> float:
        """The step's error ratio: norm(err / (atol + rtol max(|y|, |y1|))), err = h sum_i b_err[i] k[i] (Hairer's
        RMS by default)."""
        with torch.no_grad():  # the step size is a constant of the backward
            err = _combine(None, k, h, self.b_err)
            scaled = err.div_(torch.maximum(y.abs(), y1.abs()).mul_(self.rtol).add_(self.atol))
            if self.norm is None:
                return float(torch.linalg.vector_norm(scaled)) / math.sqrt(scaled.numel())
            return float(self.norm(scaled))

    def next_step(self, h: float, ratio: float, accepted: bool) -> float:
        if ratio == 0:
            return h * self.ifactor
        if math.isnan(ratio):
            return h * self.dfactor
        dfactor = 1.0 if accepted else self.dfactor
        return h * min(self.ifactor, max(self.safety / ratio ** (1.0 / self.tableau.order), dfactor))

    def dense(self, y, k, t0, h, t) -> Tensor:
        """The step's interpolant at time t in [t0, t0 + h]."""
        theta = (t - t0) / h
        weights = [sum(p * theta ** (j + 1) for j, p in enumerate(row)) for row in self.tableau.interpolant]
        return _combine(y, k, h, weights)

    def initial_step(self, t0, y, k0) -> float:
        """Hairer's starting step (II.4), from norms of y0, f0 and a difference quotient of f."""
        with torch.no_grad():
            scale = y.abs().mul_(self.rtol).add_(self.atol)
            norm = self.norm or (lambda v: torch.linalg.vector_norm(v) / math.sqrt(v.numel()))
            d0, d1 = float(norm(y / scale)), float(norm(k0 / scale))
            h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
            f1 = self.f(t0 + h0, torch.add(y, k0, alpha=h0))
            d2 = float(norm((f1 - k0).div_(scale))) / h0
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / self.tableau.order)
        return min(100 * h0, h1)

    # -- the solves ------------------------------------------------------------------------------------------------

    def solve(self, y0: Tensor, times: list, event_fn=None):
        """y at every output time (T, 1, N); with ``event_fn`` (times = [t0]), (event time, y at it)."""
        if y0.numel() == 0 and event_fn is None:  # nothing to integrate
            return y0.expand(len(times), *y0.shape).clone()
        if self.tableau.error_order == 0:
            return self._solve_fixed(y0, times, event_fn)
        return self._solve_adaptive(y0, times, event_fn)

    def _solve_adaptive(self, y0, times, event_fn):
        t, y = times[0], y0
        k0 = self.f(t, y)
        h = self.first_step if self.first_step is not None else self.initial_step(t, y, k0)
        marks = sorted({*(x for x in self.step_t if x > t), *(x for x in self.jump_t if x > t)})
        jumps = set(self.jump_t)
        out, index, attempts = [y0], 1, 0
        sign0 = None if event_fn is None else _sign(event_fn(t, y))
        while index < len(times) or event_fn is not None:
            if attempts >= self.max_num_steps:
                raise RuntimeError(f"odeint: more than `max_num_steps` = {self.max_num_steps} step attempts, at "
                                   f"t = {t:.9g}")
            attempts += 1
            if not math.isfinite(h):
                h = self.min_step
            h = min(max(h, self.min_step), self.max_step)
            if not t + h > t:
                raise RuntimeError(f"odeint: the step size underflowed (h = {h:.3g}) at t = {t:.9g}: the problem "
                                   "may be stiff or singular there, or `func` returned NaN or Inf")
            self.on_step(t, y, h)
            t1, mark = t + h, None
            while marks and marks[0] <= t:
                marks.pop(0)
            if marks and marks[0] < t1:
                mark = marks[0]
                t1, h = mark, mark - t
            y1, k = self.stages(t, y, k0, h, t1)
            ratio = self.error_ratio(y, y1, k, h)
            accept = (ratio <= 1 and h <= self.max_step) or h <= self.min_step
            if not accept:
                self.on_reject(t, y, h)
                self.rejected += 1
                h = self.next_step(h, ratio, False)
                continue
            self.accepted += 1
            self.on_accept(t, y, h)
            if mark is not None and mark in jumps:
                k0 = self.f(t1, y1, 1)
            elif self.tableau.fsal:
                k0 = k[-1]
            else:  # its slope at t1 closes the dense output too
                k0 = self.f(t1, y1)
                k = k + [k0]
            if event_fn is not None and _sign(event_fn(t1, y1)) != sign0:
                return self._locate_event(event_fn, sign0, t, t1, lambda s: self.dense(y, k, t, h, s))
            while index < len(times) and times[index] <= t1:
                out.append(y1 if times[index] == t1 else self.dense(y, k, t, h, times[index]))
                index += 1
            t, y = t1, y1
            h = self.next_step(h, ratio, True)
        return torch.stack(out)

    def _locate_event(self, event_fn, sign0, t0, t1, state_at):
        """Bisection between t0 and t1 for the time the event function changes sign, to within atol, on the step's
        interpolant ``state_at(t)``: (event time, state there)."""
        lo, hi = t0, t1
        with torch.no_grad():
            for _ in range(max(0, math.ceil(math.log2((t1 - t0) / max(self.atol, 1e-300))))):
                mid = (lo + hi) / 2
                if _sign(event_fn(mid, state_at(mid))) == sign0:
                    lo = mid
                else:
                    hi = mid
        event_t = (lo + hi) / 2
        return event_t, state_at(event_t)

    def _solve_fixed(self, y0, times, event_fn):
        if event_fn is not None:
            if self.step_size is None:
                raise ValueError("odeint: events with a fixed-step method need options['step_size']")
            grid = None
        elif self.grid is not None:
            grid = self.grid(times)
            if grid[0] != times[0] or grid[-1] != times[-1]:
                raise ValueError("odeint: options['grid_constructor'] must return a grid from t[0] to t[-1]")
        elif self.step_size is None:
            grid = list(times)
        else:
            n = math.ceil((times[-1] - times[0]) / self.step_size + 1)
            grid = [times[0] + i * self.step_size for i in range(n)]
            grid[-1] = times[-1]
        out, index, y = [y0], 1, y0
        sign0 = None if event_fn is None else _sign(event_fn(times[0], y0))
        step = 0
        while True:
            if grid is not None:
                if step + 1 >= len(grid):
                    break
                t0, t1 = grid[step], grid[step + 1]
            else:
                if step >= 20000:
                    raise RuntimeError("odeint: no event within 20000 fixed steps")
                t0 = times[0] + step * self.step_size
                t1 = t0 + self.step_size
            step += 1
            h = t1 - t0
            self.on_step(t0, y, h)
            k0 = self.f(t0, y, 1 if self.perturb else 0)
            y1 = self._fixed_step(t0, y, k0, h, t1)
            f1 = None
            if self.interp == "cubic":
                f1 = self.f(t1, y1)
            if event_fn is not None:
                if _sign(event_fn(t1, y1)) != sign0:
                    return self._locate_event(event_fn, sign0, t0, t1,
                                              lambda s: self._between(t0, y, k0, t1, y1, f1, s))
                y = y1
                continue
            while index < len(times) and times[index] <= t1:
                out.append(self._between(t0, y, k0, t1, y1, f1, times[index]))
                index += 1
            y = y1
        return torch.stack(out)

    def _fixed_step(self, t0, y, k0, h, t1):
        """y1 of a fixed step; with ``perturb`` its last stage is evaluated just before t1."""
        tab = self.tableau
        k = [k0]
        for i, row in enumerate(self.rows, start=1):
            g = _combine(y, k, h, row)
            c = tab.c[i]
            k.append(self.f(t1, g, -1 if self.perturb else 0) if c == 1.0 else self.f(t0 + c * h, g))
        return _combine(y, k, h, self.b)

    def _between(self, t0, y0, f0, t1, y1, f1, t):
        """A fixed-step solution at t in (t0, t1]: linear, or cubic Hermite with f1 = f(t1, y1)."""
        if t == t1:
            return y1
        x = (t - t0) / (t1 - t0)
        if f1 is None:
            return y0 + x * (y1 - y0)
        h = t1 - t0
        return ((1 + 2 * x) * (1 - x) ** 2 * y0 + x * (1 - x) ** 2 * h * f0 + x * x * (3 - 2 * x) * y1
                + x * x * (x - 1) * h * f1)


def _combine(y: Tensor, k: list, h: float, weights) -> Tensor:
    """y + h sum_j weights[j] k[j] over the nonzero weights: a stage input, the solution or the dense output
    (y=None: the sum alone). The increment is summed first and added to y once, so y is rounded once per step.
    One op per term, each an autograd node whose backward scales the incoming gradient (a fused op over stacked
    stages would copy the stages forward and backward, which costs more at the sizes of a whole-state solve)."""
    inc = None
    for kj, w in zip(k, weights):
        if w != 0.0:
            inc = torch.mul(kj, h * w) if inc is None else inc.add_(kj, alpha=h * w)
    if y is None:
        return torch.zeros_like(k[0]) if inc is None else inc
    return y if inc is None else y + inc


def _ignore(*args):
    pass


def _sign(value) -> float:
    """The sign of an event function's value (a one-element tensor)."""
    with torch.no_grad():
        return float(torch.sign(value.detach()).reshape(()))
