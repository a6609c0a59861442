"""accel.odeint and accel.odeint_event: torchdiffeq's interface and rules, with accel's per-sample extensions.

Flow: odeint checks its arguments, flattens the state (accel/ode/state.py) and runs one of two solvers:
- by default (torchdiffeq's meaning of every argument), accel/ode/flat_solver.py: the whole state is one
  vector with one step size; func gets a scalar time. With grad enabled the solve is recorded by autograd
  (backpropagation through the accepted steps), so closures and everything func reads get gradients.
- with ``per_sample=True`` (accel's extension), accel/ode/per_sample.py: every sample of the batch (the first
  dimension of y0) has its own step size, error norm, output times (``t`` of shape (T, B)) and events; func gets
  the times shaped (B, 1, ..., 1). Its gradient is the discrete adjoint, which recomputes the stages.

Gradients with respect to the output times follow from the ODE itself (accel/ode/time_gradient.py, in both
modes): one more evaluation of func per output time, only when t requires grad.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from accel.ode import time_gradient
from accel.ode.event_gradient import EventGradient
from accel.ode.flat_solver import FlatSolver
from accel.ode.per_sample import solve_per_sample
from accel.ode.state import State
from accel.ops._checks import check_count
from accel.reference.ode import METHODS

# options of the default solver, as torchdiffeq names them; accel's per-sample options are per_sample.OPTIONS
ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "max_num_steps", "step_t",
                    "jump_t", "dtype", "norm")
FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "norm", "dtype")


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None, per_sample=False,
           regularization=None, return_stats=False):
    """Solves dy/dt = func(t, y) from y(t[0]) = y0 and returns y at every time of t, as torchdiffeq.odeint does.

    Args:
        func: ``func(t, y)``: t a scalar tensor, y shaped like y0 (a tensor or a tuple of tensors); returns dy/dt
            shaped like y. An nn.Module or any callable (closures over parameters get their gradients).
        y0: the initial state, a float32 or float64 tensor of any shape, or a tuple of them.
        t: (T,) strictly increasing or decreasing times; t[0] is the initial time. With ``per_sample``, also
            (T, B): every sample its own times.
        rtol, atol: the error tolerances (Python numbers, or one-element tensors).
        method: 'dopri5' (default), 'tsit5', 'bosh3', 'adaptive_heun', 'fehlberg2' (adaptive); 'rk4' (Kutta's 3/8
            rule), 'euler', 'midpoint', 'heun2', 'heun3' (fixed steps of ``options['step_size']``, or one step per
            output interval).
        options: torchdiffeq's solver options: first_step, safety, ifactor, dfactor, min_step, max_step,
            max_num_steps, step_t, jump_t, norm (a callable of the state's structure) for the adaptive methods;
            step_size, grid_constructor, interp ('linear' or 'cubic'), perturb for the fixed ones. With
            ``per_sample``, accel's options instead (see accel.ode.per_sample.OPTIONS).
        event_fn: ``event_fn(t, y)``: the solve stops where it changes sign (its smallest element, each element
            made positive at t[0]); only t[0] is used and (event time, solution (2, ...)) is returned.
        per_sample: accel's per-sample step control: y0's first dimension is the batch, every sample is stepped
            and checked on its own, func gets times shaped (B, 1, ..., 1), and event times are (B,).
        regularization: with ``per_sample``, also return per sample the solver-heuristic regularizer of
            "Opening the Blackbox": 'error' (ERNODE) or 'stiffness' (STRNODE).
        return_stats: also return a dict of statistics (``nfe`` and step counts).

    Returns y at every time (T, *y0.shape) (a tuple for a tuple y0), or (event time, solution) with ``event_fn``;
    then the regularizer and the statistics when asked for.
    """
    op = "odeint"
    problem = _Problem(op, func, y0, t, rtol, atol, method, options, per_sample, event_fn is not None)
    if per_sample:
        return solve_per_sample(problem, event_fn, regularization, return_stats)
    if regularization is not None:
        raise ValueError(f"{op}: `regularization` needs per_sample=True (it is a per-sample estimate), got "
                         f"{regularization!r}")
    solver = problem.flat_solver(problem.rtol, problem.atol, problem.options)
    event = problem.event_function(event_fn)
    if event is None:
        result = problem.finish(solver.solve(problem.shifted_initial_state(), problem.times))
    else:
        s_event, y_event = solver.solve(problem.state.flat, problem.times[:1], event)
        result = problem.event_result(event_fn, s_event, y_event)
    if return_stats:
        return result, {"nfe": solver.nfe, "accepted": solver.accepted, "rejected": solver.rejected}
    return result


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None, **kwargs):
    """Solves from t0 until ``event_fn(t, y)`` changes sign: (event time, solution (2, ...) at t0 and at the event),
    as torchdiffeq.odeint_event. ``odeint_interface``: accel.odeint (default) or accel.odeint_adjoint. The event
    time is differentiable with respect to y0 and func's parameters (by the implicit function theorem), and so is
    the state at it (through the event time as well)."""
    solve = odeint if odeint_interface is None else odeint_interface
    if not isinstance(t0, Tensor):
        raise TypeError(f"odeint_event: `t0` must be a tensor, got {type(t0).__name__}")
    direction = -1.0 if reverse_time else 1.0
    t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + direction])
    return solve(func, y0, t, event_fn=event_fn, **kwargs)


class _Problem:
    """odeint's checked arguments: the flattened state, the times (made increasing), the method and its options,
    and func wrapped for the solvers."""

    def __init__(self, op, func, y0, t, rtol, atol, method, options, per_sample, event):
        if not callable(func):
            raise TypeError(f"{op}: `func` must be callable as func(t, y), got {type(func).__name__}")
        self.op, self.func, self.per_sample = op, func, bool(per_sample)
        self.state = State(op, y0, self.per_sample)
        method = "dopri5" if method is None else method
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"{op}: `method` must be one of {tuple(METHODS)}, got {method!r}")
        self.method, self.tableau = method, METHODS[method]
        self.rtol, self.atol = _tolerance(op, "rtol", rtol), _tolerance(op, "atol", atol)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(f"{op}: `rtol` and `atol` cannot both be 0")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"{op}: `options` must be a dict or None, got {type(options).__name__}")
        self.options = dict(options or {})
        self.t = t
        values = _check_times(op, t, self.state, self.per_sample, event)
        if self.per_sample:
            return
        self.direction = -1.0 if len(values) > 1 and values[1] < values[0] else 1.0
        self.times = [self.direction * x for x in values]
        self.t_dtype = self.state.dtype
        self.np_dtype = np.float32 if self.t_dtype == torch.float32 else np.float64

    def call(self, s: float, y: Tensor, nudge: int = 0) -> Tensor:
        """func at solver time s (the negated time for a decreasing t), moved by one unit in the last place of
        func's time dtype in the direction ``nudge`` of solver time, on flat rows y."""
        state, direction = self.state, self.direction
        if nudge:
            s = float(np.nextafter(self.np_dtype(s), self.np_dtype(nudge * math.inf)))
        t = torch.scalar_tensor(direction * s, dtype=self.t_dtype, device=state.device)
        if state.is_tuple:
            dy = state.flatten_derivative(self.op, self.func(t, state.unflatten(y)))
        else:  # the common case, without the tuple's bookkeeping
            shape = state.shapes[0]
            dy = self.func(t, y.view(shape))
            if not isinstance(dy, Tensor) or dy.shape != shape:
                dy = state.flatten_derivative(self.op, dy)  # raises the error that names what is wrong
            dy = dy.reshape(1, -1)
        return dy if direction > 0 else -dy

    def flat_solver(self, rtol, atol, options, func=None, norm=None, backward=False) -> FlatSolver:
        """The default solver for this problem; ``backward``: for the adjoint's solve, whose solver time runs
        against the forward's (its user time is -direction * s)."""
        tab, op = self.tableau, self.op
        known = ADAPTIVE_OPTIONS if tab.error_order else FIXED_OPTIONS
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{op}: `options` has {unknown[0]!r}, which method {self.method!r} does not take; it "
                             f"takes {known}")
        sign = -self.direction if backward else self.direction  # user time = sign * solver time
        kw = {name: options[name] for name in ("safety", "ifactor", "dfactor", "min_step", "max_step", "first_step",
                                               "step_size") if options.get(name) is not None}
        for name, value in kw.items():
            kw[name] = _positive(op, name, value, zero_ok=name == "min_step")
        if "max_num_steps" in options:
            check_count(op, "options['max_num_steps']", options["max_num_steps"])
            kw["max_num_steps"] = options["max_num_steps"]
        for name in ("step_t", "jump_t"):
            if options.get(name) is not None:
                kw[name] = [sign * x for x in torch.as_tensor(options[name]).reshape(-1).tolist()]
        if "interp" in options:
            if options["interp"] not in ("linear", "cubic"):
                raise ValueError(f"{op}: `options['interp']` must be 'linear' or 'cubic', got {options['interp']!r}")
            kw["interp"] = options["interp"]
        kw["perturb"] = bool(options.get("perturb", False))
        constructor = options.get("grid_constructor")
        if constructor is not None:
            if "step_size" in kw:
                raise ValueError(f"{op}: `options['step_size']` and `options['grid_constructor']` exclude each other")
            y0, like = self.state.unflatten(self.state.flat.detach()), self.t.detach()
            kw["grid"] = lambda times: [sign * x for x in torch.as_tensor(
                constructor(func or self.func, y0, like.new_tensor([sign * x for x in times]))).tolist()]
        if norm is None:
            norm = self.state.user_norm(options["norm"]) if options.get("norm") is not None else \
                self.state.mixed_norm()
        kw["callbacks"] = self._callbacks("_adjoint" if backward else "", sign)
        return FlatSolver(func or self.call, tab, rtol, atol, norm, **kw)

    def _callbacks(self, suffix, sign):
        """func's callback_step, callback_accept_step and callback_reject_step (with ``suffix``: the adjoint's), as
        torchdiffeq calls them: (t0, y0, dt) in the user's time and structure."""
        callbacks = []
        for name in ("callback_step", "callback_accept_step", "callback_reject_step"):
            callback = getattr(self.func, name + suffix, None)
            if callback is not None and name != "callback_step" and self.tableau.error_order == 0:
                warnings.warn(f"{self.op}: method {self.method!r} takes fixed steps and never calls `{name}`")
                callback = None
            if callback is not None:
                def call(s, y, h, callback=callback):
                    like = self.state.flat
                    return callback(torch.tensor(sign * s, dtype=self.t_dtype, device=like.device),
                                    self.state.unflatten(y[..., :like.shape[-1]]),
                                    torch.tensor(h, dtype=self.t_dtype, device=like.device))
                callback = call
            callbacks.append(callback)
        return tuple(callbacks)

    def event_function(self, event_fn):
        """The event function on solver time and flat rows, as one value that starts positive: the smallest of its
        elements, each multiplied by its sign at t[0]."""
        if event_fn is None:
            return None
        if not callable(event_fn):
            raise TypeError(f"{self.op}: `event_fn` must be callable as event_fn(t, y), got {type(event_fn).__name__}")
        state, direction = self.state, self.direction

        def value(s, y):
            t = torch.tensor(direction * s, dtype=self.t_dtype, device=state.device)
            return event_fn(t, state.unflatten(y))
        with torch.no_grad():
            signs = torch.sign(torch.as_tensor(value(self.times[0], state.flat.detach())))
        self.event_signs = signs
        return lambda s, y: (torch.as_tensor(value(s, y)) * signs).min()

    def event_result(self, event_fn, s_event: float, y_event: Tensor):
        """(event time, solution (2, ...)), differentiable through the event time (EventGradient)."""
        state, signs = self.state, self.event_signs
        rate = lambda tau, y: state.flatten_derivative(self.op, self.func(tau.to(self.t_dtype), state.unflatten(y)))
        event = lambda tau, y: (torch.as_tensor(event_fn(tau, state.unflatten(y))) * signs).min()
        event_t, y_event = EventGradient.apply(rate, event, self.time_tensor(s_event), y_event)
        return event_t, state.unflatten(torch.stack([state.flat, y_event]), (2,))

    def time_tensor(self, s: float) -> Tensor:
        return torch.tensor(self.direction * s, dtype=self.t.dtype, device=self.t.device)

    def shifted_initial_state(self) -> Tensor:
        """y0, shifted (when t requires grad) to carry d/dt0 (accel/ode/time_gradient.py)."""
        flat = self.state.flat
        if not self.t.requires_grad:
            return flat
        with torch.no_grad():
            f0 = self.call(self.times[0], flat) * self.direction
        return time_gradient.shifted_initial_state(flat, self.t[0].to(flat.dtype), f0)

    def finish(self, ys: Tensor):
        """The user's structure from the solver's (T, 1, N), with y(t[0]) = y0 itself and the time terms."""
        flat0 = self.state.flat
        if self.t.requires_grad and ys.shape[0] > 1:
            with torch.no_grad():
                fs = torch.stack([self.call(s, y.detach()) * self.direction
                                  for s, y in zip(self.times[1:], ys[1:])])
            ys = time_gradient.with_output_terms(flat0, ys, self.t.to(flat0.dtype)[:, None], fs)
        else:
            ys = torch.cat([flat0[None], ys[1:]])
        return self.state.unflatten(ys, (ys.shape[0],))


def _tolerance(op, name, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: `{name}` must be a number (one tolerance for the whole state), got a tensor of "
                             f"shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{op}: `{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive(op, name, value, zero_ok=False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (
            value == 0 and not zero_ok):
        raise ValueError(f"{op}: `options['{name}']` must be a number {'>=' if zero_ok else '>'} 0, got {value!r}")
    return float(value)


def _check_times(op, t, state: State, per_sample: bool, event: bool) -> list | None:
    """The times as Python floats (None for per-sample times (T, B)), checked."""
    dims = (1, 2) if per_sample else (1,)
    if not isinstance(t, Tensor) or t.dim() not in dims or t.shape[0] < 1 or not t.dtype.is_floating_point:
        shapes = "(T,) or (T, B)" if per_sample else "(T,)"
        raise ValueError(f"{op}: `t` must be a floating-point tensor of shape {shapes}, got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if t.device.type == "meta":
        raise ValueError(f"{op}: `t` must hold values, got a tensor on the meta device")
    if t.dim() == 2 and t.shape[1] != state.rows:
        raise ValueError(f"{op}: `t` of shape (T, B) must have B = {state.rows} (y0's batch), got {tuple(t.shape)}")
    if t.dim() == 1:  # one read of the times, checked on the host (the default solver steps on them there)
        values = t.detach().double().tolist()
        steps = [b - a for a, b in zip(values, values[1:])]
        ok = all(math.isfinite(x) for x in values) and (all(d > 0 for d in steps) or all(d < 0 for d in steps))
    else:
        d = t[1:] - t[:-1]
        values, ok = None, bool(torch.isfinite(t).all() & ((d > 0).all(0) | (d < 0).all(0)).all())
    if not ok and not event:
        raise ValueError(f"{op}: `t` must be finite and strictly increasing or strictly decreasing")
    return values
