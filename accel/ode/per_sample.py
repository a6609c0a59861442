"""accel.odeint's per-sample solve (``per_sample=True``): adaptive explicit Runge-Kutta integration of a batch,
every sample with its own step size, error norm and output times, over the fused step ops accel.ops.rk_stage,
rk_finalize, rk_begin and rk_accept. The reference is accel/reference/ode.py (the same tableaus, error norm,
initial step, controllers and output rule, one sample at a time).

One iteration of the loop attempts one step for every sample at once: the stages (one rk_stage per stage), then
rk_finalize's error norm and stiffness estimate per sample, then the per-sample accept/reject and the next step
size, all as tensor operations. Nothing in an iteration reads a value back to the host; whether every sample has
reached its last output time (and whether a step size underflowed) is checked every `check_every` iterations.
A sample that has finished takes steps of size 0, which leave it unchanged.

Output times: with dense output (the adaptive methods, the default), steps are not shortened and every output
time a step passes gets the method's interpolant, so the number of steps does not grow with the number of
output times; otherwise (fixed steps, or dense_output=False, as the reference does) a step that would pass a
sample's next output time is shortened to end on it.

Events: each sample stops where its event function changes sign between two steps, located by bisection on that
step's interpolant. With gradients, the batch is solved again up to each sample's event time (an output time per
sample) through the discrete adjoint, and the event times get the implicit function theorem's gradient.

Gradients (the discrete adjoint): the forward keeps, per iteration, only the state before the step, its time,
step size and acceptance, and which output rows it wrote, O(iterations B D). The backward runs the iterations in
reverse, recomputes each accepted step's stages from its saved state with autograd on, and pulls the adjoint
through it. Step sizes and accept/reject decisions are constants of the backward: it differentiates the discrete
map the solver took.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from accel.ode import time_gradient
from accel.ode.event_gradient import EventGradient
from accel.ops._checks import check_count, check_tolerances, is_real
from accel.ops.rk_control import interpolate_at, rk_accept_unchecked, rk_begin_unchecked
from accel.ops.rk_finalize import rk_finalize
from accel.ops.rk_stage import rk_stage
from accel.reference.ode import METHODS, Tableau, initial_step

CONTROLLERS = ("I", "PI")
REGULARIZATIONS = (None, "error", "stiffness")
# odeint's options with per_sample=True
OPTIONS = ("controller", "safety", "first_step", "step_size", "min_step", "max_num_steps", "check_every", "params",
           "dense_output")


def solve_per_sample(problem, event_fn, regularization, return_stats):
    """accel.odeint with per_sample=True, from its checked arguments (accel.ode.odeint._Problem)."""
    op, state, options = problem.op, problem.state, problem.options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{op}: `options` has {unknown[0]!r}, which per_sample=True does not take; it takes {OPTIONS}")
    tableau = check_options(op, problem.method, problem.rtol, problem.atol, regularization=regularization,
                            **{k: v for k, v in options.items() if k not in ("params", "dense_output")})
    y0, t = state.flat, problem.t
    B = state.rows
    # each sample's direction of time: the solver steps on sign * t, increasing, with dy/ds = sign f(sign s, y)
    step = (t[1] - t[0]).detach() if t.shape[0] > 1 else t.new_ones(t.shape[1:])
    direction = torch.where(step < 0, -1.0, 1.0).to(device=y0.device, dtype=y0.dtype)
    times = (t.detach().to(device=y0.device, dtype=y0.dtype) * direction).contiguous()
    sign = direction.expand(B).contiguous()
    user_dims = (1,) * (len(state.shapes[0]) - 1)

    def func(tb, y):
        dy = state.flatten_derivative(op, problem.func((sign * tb).view(B, *user_dims), state.unflatten(y)))
        return dy * sign[:, None]

    params = options.get("params")
    if params is None:
        if isinstance(problem.func, nn.Module):
            params = tuple(p for p in problem.func.parameters() if p.requires_grad)
        elif y0.requires_grad:
            raise ValueError(f"{op}: with per_sample=True, `options['params']` must list the tensors `func` depends on "
                             "(or be ()) when y0 requires grad and `func` is not an nn.Module")
        else:
            params = ()
    try:
        params = tuple(params)
    except TypeError:
        raise TypeError(f"{op}: `options['params']` must be an iterable of tensors, got {type(params).__name__}") from None
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{op}: `options['params']` must hold tensors, got {[type(p).__name__ for p in params]}")
    check_every = options.get("check_every")
    if check_every is None:
        check_every = 1 if y0.device.type == "cpu" else 4
    # a method that is not FSAL has an interpolant that needs f(t1, y1), which the per-sample loop does not keep
    dense = bool(options.get("dense_output", True)) and tableau.interpolant is not None and tableau.fsal
    safety = float(options.get("safety", 0.9))
    solver = _Solver(func, tableau, times, problem.rtol, problem.atol, options.get("controller", "I"), safety,
                     options.get("first_step"), options.get("step_size", math.inf),
                     float(options.get("min_step", 0.0)),
                     int(options.get("max_num_steps", 100_000)), check_every, dense, regularization)
    if B == 0:
        solver.stats = _stats(0, 0, [], [], [])
        empty = y0.new_empty(1 if event_fn is not None else t.shape[0], 0, y0.shape[1])
        results = [problem.state.unflatten(empty, (empty.shape[0],))] + ([y0.new_zeros(0)] if regularization else [])
        results += [solver.stats] if return_stats else []
        return tuple(results) if len(results) > 1 else results[0]
    needs_grad = torch.is_grad_enabled() and (y0.requires_grad or t.requires_grad
                                              or any(p.requires_grad for p in params))
    if event_fn is not None:
        if regularization is not None:
            raise ValueError(f"{op}: `regularization` cannot be combined with `event_fn`")
        if not dense:
            raise ValueError(f"{op}: per-sample events need an adaptive method's interpolant, got method "
                             f"{problem.method!r}")
        event = _sample_event(op, event_fn, state, sign, user_dims)
        start = times[0] if times.dim() == 2 else times[0].expand(B)
        with torch.no_grad():
            solver.times = torch.stack([start, torch.full_like(start, math.inf)])  # each runs until its event
            event_s, y_event = solver.solve(y0, False, event)
        event_t = event_s * sign
        if needs_grad:  # solve again up to each sample's event time as its output time, differentiably
            solver.times = torch.stack([start, event_s]).contiguous()
            y_event = _Solve.apply(solver, y0, *params)[-1]
            event_t, y_event = EventGradient.apply(lambda tau, y: func(sign * tau, y) * sign[:, None],
                                                    lambda tau, y: event(sign * tau, y), event_t, y_event)
        solution = problem.state.unflatten(torch.stack([y0, y_event]), (2,))
        results = [event_t.to(t.dtype), solution]
        return tuple(results + [solver.stats]) if return_stats else tuple(results)
    # the times as (T, B) in y's dtype, and f at them in the user's time, for their gradients
    per_sample_t = (t if t.dim() == 2 else t[:, None].expand(-1, B)).to(y0.dtype)
    user_f = lambda s, y: func(s.expand(B).contiguous(), y) * sign[:, None]  # noqa: E731
    start_state = y0
    if t.requires_grad:
        with torch.no_grad():
            f0 = user_f(times[0], y0)
        start_state = time_gradient.shifted_initial_state(y0, per_sample_t[0], f0)
    if needs_grad:
        results = _Solve.apply(solver, start_state, *params)
    else:
        with torch.no_grad():
            results = solver.solve(y0, keep_trace=False)
    ys, *regularizer = results if regularization else (results,)
    if t.requires_grad and ys.shape[0] > 1:
        with torch.no_grad():
            fs = torch.stack([user_f(times[i], ys[i]) for i in range(1, ys.shape[0])])
        ys = time_gradient.with_output_terms(y0, ys, per_sample_t, fs)
    results = [problem.state.unflatten(ys, (ys.shape[0],)), *regularizer] + ([solver.stats] if return_stats else [])
    return tuple(results) if len(results) > 1 else results[0]


def _sample_event(op, event_fn, state, sign, user_dims):
    """Each sample's event value (B,) at solver times (B,): the smallest of its elements, each made positive at the
    start."""
    B = state.rows

    def value(tb, y):
        v = torch.as_tensor(event_fn((sign * tb).view(B, *user_dims), state.unflatten(y)))
        if v.dim() == 0 or v.shape[0] != B:
            raise ValueError(f"{op}: with per_sample=True `event_fn` must return one value (or a row of values) per "
                             f"sample, shape (B, ...) with B = {B}, got {tuple(v.shape)}")
        return v.reshape(B, -1)
    signs = []

    def combined(tb, y):
        v = value(tb, y)
        if not signs:
            signs.append(torch.sign(v))
        return (v * signs[0]).min(1).values
    return combined


def check_options(op, method, rtol=1e-6, atol=1e-8, controller="I", safety=0.9, first_step=None, step_size=None,
                  min_step=0.0, max_num_steps=100_000, check_every=None, regularization=None) -> Tableau:
    """Checks the per-sample solver's options (``op`` names the caller in the errors); returns the method's
    tableau."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{op}: `method` must be one of {tuple(METHODS)}, got {method!r}")
    check_tolerances(op, rtol, atol)
    if controller not in CONTROLLERS:
        raise ValueError(f"{op}: `controller` must be one of {CONTROLLERS}, got {controller!r}")
    if not (is_real(safety) and 0 < safety <= 1):
        raise ValueError(f"{op}: `safety` must be in (0, 1], got {safety!r}")
    for name, value in (("first_step", first_step), ("step_size", step_size)):
        if value is not None and not (is_real(value) and value > 0):
            raise ValueError(f"{op}: `{name}` must be a finite number > 0 or None, got {value!r}")
    tableau = METHODS[method]
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"{op}: `regularization` must be one of {REGULARIZATIONS}, got {regularization!r}")
    if regularization is not None and tableau.error_order == 0:
        raise ValueError(f"{op}: `regularization` needs an error estimate, and method {method!r} has no error "
                         f"estimate to regularize")
    if regularization == "stiffness" and tableau.stability_bound is None:
        raise ValueError(f"{op}: `regularization` 'stiffness' needs a stability bound, and method {method!r} has no "
                         f"stability bound (dopri5 and tsit5 have one)")
    if not (is_real(min_step) and min_step >= 0):
        raise ValueError(f"{op}: `min_step` must be a finite number >= 0, got {min_step!r}")
    check_count(op, "max_num_steps", max_num_steps)
    if check_every is not None:
        check_count(op, "check_every", check_every)
    return tableau


class _Trace(NamedTuple):
    """What the backward needs of one iteration: the state before it, its time and step per sample, which
    samples accepted it, and the output rows [first_row, end_row) each sample wrote in it."""
    y: Tensor
    t: Tensor
    step: Tensor
    accepted: Tensor
    first_row: Tensor
    end_row: Tensor


class _Solver:
    def __init__(self, func, tableau, t, rtol, atol, controller, safety, first_step, step_size, min_step, max_steps,
                 check_every, dense_output=True, regularization=None):
        self.func, self.tableau, self.times = func, tableau, t
        self.rtol, self.atol, self.controller, self.safety = rtol, atol, controller, safety
        self.first_step, self.step_size, self.min_step = first_step, step_size, min_step
        self.max_steps, self.check_every = max_steps, check_every
        self.adaptive = tableau.error_order > 0
        # rows of the stage inputs: for an FSAL method the last stage's input is the solution y1
        self.rows = [list(row) for row in tableau.a[1:]]
        self.fsal = tableau.fsal
        self.b = list(tableau.b)
        self.interpolant = tableau.interpolant if dense_output else None
        self.regularization = regularization
        self.regularizer_step = None  # stiffness: the iteration whose estimate is each sample's largest
        self.stats: dict = {}
        self.trace: list[_Trace] = []

    def stages(self, stage_times, y, step, k):
        """Fills the stages k[1:] of a step from y, given k[0] = f(t, y), into the buffer k (s, B, D); returns y1
        and the input of the stage before the last (for the stiffness estimate)."""
        g_prev = g = y
        for i, row in enumerate(self.rows, start=1):
            g_prev, g = g, rk_stage(y, k, step, row)
            k[i] = self.func(stage_times[i], g)
        y1 = g if self.fsal else rk_stage(y, k, step, self.b)
        return y1, g_prev

    def step(self, t0, y, step, all_stages=False):
        """y1 of one step from (t0, y), through autograd: the backward's recomputation. The stages go into a
        list (autograd forbids overwriting a buffer it saved). An FSAL method's last stage, f(y1), is not needed
        for y1, only for the dense output and the estimates: with all_stages, returns (y1, the stages (s, B, D),
        the input of the stage before the last)."""
        k, g = [self.func(t0, y)], [y]
        rows = self.rows[:-1] if self.fsal else self.rows
        for i, row in enumerate(rows, start=1):
            g.append(rk_stage(y, torch.stack(k), step, row))
            k.append(self.func(t0 + self.tableau.c[i] * step, g[-1]))
        y1 = rk_stage(y, torch.stack(k), step, self.rows[-1] if self.fsal else self.b)
        if not all_stages:
            return y1
        if self.fsal:
            k.append(self.func(t0 + step, y1))
        return y1, torch.stack(k), g[-1]

    def solve(self, y0: Tensor, keep_trace: bool, event=None) -> Tensor:
        """The solution at every output time (T, B, D); the statistics into self.stats, and with keep_trace what
        the backward needs into self.trace. Times are carried in y0's dtype. With ``event`` (a function of the
        solver's times (B,) and states (B, D), one value per sample), each sample stops at the step where the
        value changes sign, and the result is (event times (B,), states there (B, D))."""
        tab, func = self.tableau, self.func
        B, D = y0.shape
        s = len(tab.c)
        times = self.times.to(device=y0.device, dtype=y0.dtype).contiguous()
        T = times.shape[0]
        out = y0.new_empty(T, B, D)
        out[0] = y0
        t_now = times[0].expand(B).clone()
        next_index = torch.ones(B, dtype=torch.long, device=y0.device)  # the next output row per sample
        y = y0.clone()
        k = y0.new_empty(s, B, D)
        f0 = func(t_now, y)
        if not isinstance(f0, Tensor) or f0.shape != y.shape:
            raise ValueError(f"odeint: `func` must return dy/dt of y's shape {tuple(y.shape)}, got "
                             f"{tuple(f0.shape) if isinstance(f0, Tensor) else type(f0).__name__}")
        k[0] = f0
        nfe = 1
        if not self.adaptive:
            h = torch.full((B,), self.step_size, dtype=y0.dtype, device=y0.device)
        elif self.first_step is not None:
            h = torch.full((B,), self.first_step, dtype=y0.dtype, device=y0.device)
        else:
            h = initial_step(func, t_now, y, k[0], tab.error_order, self.rtol, self.atol)
            nfe += 1
        previous = torch.zeros(B, dtype=y0.dtype, device=y0.device)  # the PI controller's last accepted norm
        c, b_err, q = list(tab.c), list(tab.b_err), tab.error_order + 1
        norm = None
        errors, stiffnesses, statuses, steps = [], [], [], []
        self.trace = []
        unfinished = T > 1
        if event is not None:
            sign0 = torch.sign(event(t_now, y))
            found = torch.zeros(B, dtype=torch.bool, device=y0.device)
            at_event = (y0.clone(), k.clone(), t_now.clone(), torch.zeros_like(t_now))  # the step that crossed
        while True:
            if len(statuses) % self.check_every == 0 or len(statuses) >= self.max_steps:
                if not bool(unfinished):
                    break
                if len(statuses) >= self.max_steps:
                    raise RuntimeError(f"odeint: more than max_num_steps={self.max_steps} step attempts; "
                                       f"{int(unfinished)} samples have not finished")
                self._check_step(h, t_now, next_index < T, y, y0)
            step, stage_times = rk_begin_unchecked(t_now, h, next_index, times, c, self.interpolant is None)
            y1, g_prev = self.stages(stage_times, y, step, k)
            nfe += s - 1
            if self.adaptive:
                norm, rho = rk_finalize(y, y1, k, g_prev, step, b_err, self.rtol, self.atol)
                errors.append(norm)
                stiffnesses.append(rho)
            if keep_trace or event is not None:
                y_before, t_before, first_row = y.clone(), t_now.clone(), next_index.clone()
            if event is not None:
                k_before = k.clone()
            status, unfinished = rk_accept_unchecked(y, k, t_now, h, next_index, previous, out, y1, norm, step,
                                                     times, self.safety, q, self.controller == "PI", self.fsal,
                                                     self.interpolant)
            if not self.fsal:
                k[0] = func(t_now, y)
                nfe += 1
            statuses.append(status)
            steps.append(step)
            if event is not None:
                crossed = (status == 1) & (torch.sign(event(t_now, y)) != sign0)
                masks = (crossed[:, None], crossed[None, :, None], crossed, crossed)
                for saved, now, mask in zip(at_event, (y_before, k_before, t_before, step), masks):
                    saved.copy_(torch.where(mask, now, saved))
                found |= crossed
                next_index.masked_fill_(crossed, T)  # the sample stops here
                unfinished = (next_index < T).sum()
            if keep_trace:
                self.trace.append(_Trace(y_before, t_before, step, status == 1, first_row, next_index.clone()))
        self.stats = _stats(nfe, B, statuses, errors, stiffnesses)
        if event is not None:
            return self._locate_events(event, sign0, *at_event)
        if self.regularization is None:
            return out
        return out, self._regularizer(self.stats["step_accepted"], steps, errors, stiffnesses, y0)

    def _locate_events(self, event, sign0, y, k, t0, step):
        """Bisection on each sample's crossing step's interpolant, to within atol in time: (times, states)."""
        lo, hi = t0.clone(), t0 + step
        rounds = math.ceil(math.log2(max(float(step.max()), self.atol) / self.atol)) if step.numel() else 0
        for _ in range(rounds):
            mid = (lo + hi) / 2
            same = torch.sign(event(mid, interpolate_at(mid[None], y, k, t0, step, self.interpolant)[0])) == sign0
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        event_t = (lo + hi) / 2
        return event_t, interpolate_at(event_t[None], y, k, t0, step, self.interpolant)[0]

    def _regularizer(self, accepted, steps, errors, stiffnesses, y0):
        """ERNODE's sum of error norm x step, or STRNODE's largest |h rho| / bound, over accepted steps (B,)."""
        if not steps:
            self.regularizer_step = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
            return y0.new_zeros(y0.shape[0])
        step = torch.stack(steps)
        if self.regularization == "error":
            return torch.where(accepted, torch.stack(errors) * step, 0.0).sum(0)
        ratio = torch.where(accepted, (step * torch.stack(stiffnesses)).abs() / self.tableau.stability_bound, 0.0)
        largest, self.regularizer_step = ratio.max(0)
        return largest

    def _check_step(self, h, t_now, active, y, y0):
        """Raises when an unfinished sample's step size is at or below min_step, too small to move its time, or NaN
        (from a state or a derivative that is not finite, whose steps are all rejected)."""
        bad = active & (~(h > self.min_step) | (t_now + h == t_now))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            where = f"sample {b} at t = {float(t_now[b]):.9g}"
            if not bool(torch.isfinite(y0[b]).all()):
                raise RuntimeError(f"odeint: `y0` is not finite (NaN or Inf) for sample {b}: no step can be accepted")
            if not bool(torch.isfinite(y[b]).all() & torch.isfinite(h[b])):
                raise RuntimeError(f"odeint: the state became NaN or Inf for {where}: check `func`")
            raise RuntimeError(f"odeint: the step size underflowed (h = {float(h[b]):.3g}, min_step = "
                               f"{self.min_step:.3g}) for {where}: the problem may be stiff or singular there, or "
                               "`func` returned NaN or Inf")


def _stats(nfe, batch, statuses, errors, stiffnesses) -> dict:
    """The statistics odeint returns on request: ``nfe``, the evaluations of func (each on the whole batch);
    ``iterations``, the step attempts of the batch; per sample, ``accepted`` and ``rejected`` steps (B,); per
    iteration and sample (iterations, B): ``attempted`` (the sample had not finished), ``step_accepted``, and the
    attempt's ``error`` norm and ``stiffness`` estimate rho (|h rho| above the method's stability bound, 3.3066
    for dopri5 and 3.5068 for tsit5, means the step size is limited by stability; None for rk4)."""
    status = torch.stack(statuses) if statuses else torch.zeros(0, batch, dtype=torch.int8)
    attempted, accepted = status >= 0, status == 1
    return {"nfe": nfe, "iterations": len(statuses), "accepted": accepted.sum(0),
            "rejected": (attempted & ~accepted).sum(0), "attempted": attempted, "step_accepted": accepted,
            "error": torch.stack(errors) if errors else None,
            "stiffness": torch.stack(stiffnesses) if stiffnesses else None}


class _Solve(torch.autograd.Function):
    """The solve as one autograd node: the forward saves the trace (so autograd accounts for it and frees it after
    the backward), the backward is the discrete adjoint."""

    @staticmethod
    def forward(ctx, solver, y0, *params):
        with torch.no_grad():
            results = solver.solve(y0.detach(), keep_trace=True)
            trace = [torch.stack(field) for field in zip(*solver.trace)]  # (iterations, B, ...) per field
        solver.trace = []
        ctx.solver, ctx.num_params = solver, len(params)
        ctx.save_for_backward(*params, *trace)
        return results

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, grad_regularizer=None):
        solver, saved = ctx.solver, ctx.saved_tensors
        params, trace = saved[:ctx.num_params], _Trace(*saved[ctx.num_params:]) if len(saved) > ctx.num_params else None
        T, B, D = grad_ys.shape
        rows = torch.arange(T, device=grad_ys.device)[:, None]
        times = solver.times.to(device=grad_ys.device, dtype=grad_ys.dtype)
        tab = solver.tableau
        adjoint = grad_ys.new_zeros(B, D)
        grad_params = [torch.zeros_like(p) for p in params]
        for n in reversed(range(0 if trace is None else trace.y.shape[0])):
            written = (rows >= trace.first_row[n]) & (rows < trace.end_row[n])  # (T, B): the rows this step wrote
            grad_written = torch.where(written[..., None], grad_ys, 0.0)
            dense = solver.interpolant is not None and bool(written.any())
            if solver.interpolant is None:  # the row it wrote holds y_next itself
                adjoint = adjoint + grad_written.sum(0)
            accepted = trace.accepted[n]
            if not bool(accepted.any()):
                continue
            step = trace.step[n]
            # the regularizer's share of this step: d(norm * h) for ERNODE, d(|h rho| / bound) at the sample's
            # largest step for STRNODE
            grad_estimate = None
            if grad_regularizer is not None:
                if solver.regularization == "error":
                    grad_estimate = torch.where(accepted, grad_regularizer * step, 0.0)
                else:
                    largest = accepted & (solver.regularizer_step == n)
                    grad_estimate = torch.where(largest, grad_regularizer * step.abs() / tab.stability_bound, 0.0)
            # y_next = y1(y) where accepted, else y: the adjoint of y is J^T (accepted * adjoint) plus the
            # rejected samples' own adjoint (correct even for a func that couples samples); with dense output,
            # the rows written are interpolants of this step, from y and its stages
            kept = accepted[:, None]
            with torch.enable_grad():
                y = trace.y[n].detach().requires_grad_()
                cotangents = [torch.where(kept, adjoint, 0.0)]
                if dense or grad_estimate is not None:
                    y1, k, g_prev = solver.step(trace.t[n], y, step, all_stages=True)
                    outputs = [y1]
                    if dense:
                        outputs.append(interpolate_at(times, y, k, trace.t[n], step, solver.interpolant))
                        cotangents.append(grad_written)
                    if grad_estimate is not None:
                        norm, rho = rk_finalize(y, y1, k, g_prev, step, list(tab.b_err), solver.rtol, solver.atol)
                        outputs.append(norm if solver.regularization == "error" else rho)
                        cotangents.append(grad_estimate)
                else:
                    outputs = [solver.step(trace.t[n], y, step)]
                vjp = torch.autograd.grad(outputs, (y, *params), cotangents, allow_unused=True)
            adjoint = vjp[0] + torch.where(kept, 0.0, adjoint)
            for g, v in zip(grad_params, vjp[1:]):
                if v is not None:
                    g.add_(v)
        return None, adjoint + grad_ys[0], *grad_params
