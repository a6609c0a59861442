"""accel.odeint, odeint_adjoint and odeint_event as drop-ins for torchdiffeq's: the same solutions as torchdiffeq
(installed as a test dependency) under its arguments, exact solutions for states of any shape, tuples and
decreasing times, func called with a scalar time, gradients through closures and with respect to the times,
torchdiffeq's options, the continuous adjoint, events, and accel's per-sample extensions (time spans and events
per sample, each equal to a solve of that sample alone)."""
import math

import pytest
import torch
import torchdiffeq
from torch import nn

import accel

F64 = torch.float64


class Field(nn.Module):
    """dy/dt = tanh(y A) + sin(t): nonlinear, time-dependent, with one parameter."""

    def __init__(self, d=4, seed=0):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 0.5)

    def forward(self, t, y):
        return torch.tanh(y @ self.A) + torch.sin(t)


def rotation(dtype=F64):
    """A damped rotation, y' = y M^T for y (..., 2), and its exact flow."""
    M = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=dtype)
    return (lambda t, y: y @ M.T), (lambda y0, dt: y0 @ torch.linalg.matrix_exp(M * dt).T)


@pytest.mark.parametrize("method, options", [
    ("dopri5", None), ("rk4", {"step_size": 0.05}), ("euler", {"step_size": 0.05}), ("midpoint", None),
    ("heun3", {"step_size": 0.1}), ("rk4", {"step_size": 0.05, "interp": "cubic"})])
@pytest.mark.parametrize("reverse", [False, True])
def test_same_solution_as_torchdiffeq(method, options, reverse):
    f = Field()
    y0 = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=F64)
    t = t.flip(0) if reverse else t
    with torch.no_grad():
        got = accel.odeint(f, y0, t, method=method, options=options)
        want = torchdiffeq.odeint(f, y0, t, method=method, options=options)
    assert got.shape == want.shape == (4, 3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", ["bosh3", "adaptive_heun", "fehlberg2"])
def test_low_order_methods_interpolate_more_accurately_than_torchdiffeq(method):
    """torchdiffeq interpolates these through a midpoint value that is only first-order accurate; accel uses the
    cubic Hermite interpolant (tests/test_ode_reference.py). Between steps accel's outputs are closer to the exact
    solution; at t1, a step's end, both are the step's own solution (bosh3's steps are the same: same NFE)."""
    f = Field()
    y0 = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=F64)
    calls = {"accel": 0, "torchdiffeq": 0}

    def counted(name):
        return lambda s, y: calls.__setitem__(name, calls[name] + 1) or f(s, y)
    with torch.no_grad():
        exact = accel.odeint(f, y0, t, rtol=1e-12, atol=1e-14)
        got = accel.odeint(counted("accel"), y0, t, method=method)
        want = torchdiffeq.odeint(counted("torchdiffeq"), y0, t, method=method)
    ours, theirs = (got - exact).abs().amax((1, 2)), (want - exact).abs().amax((1, 2))
    assert (ours[1:] < theirs[1:]).all(), (ours, theirs)
    if method == "bosh3":
        assert calls["accel"] == calls["torchdiffeq"]


def test_same_steps_as_torchdiffeq():
    f = Field()
    y0 = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    calls = {"accel": [], "torchdiffeq": []}
    with torch.no_grad():
        accel.odeint(lambda s, y: calls["accel"].append(float(s)) or f(s, y), y0, t, rtol=1e-6, atol=1e-8)
        torchdiffeq.odeint(lambda s, y: calls["torchdiffeq"].append(float(s)) or f(s, y), y0, t, rtol=1e-6,
                           atol=1e-8)
    assert len(calls["accel"]) == len(calls["torchdiffeq"])
    torch.testing.assert_close(torch.tensor(calls["accel"]), torch.tensor(calls["torchdiffeq"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(), (2,), (5, 2), (3, 4, 5, 2)])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-7), (torch.float32, 2e-4)])
def test_exact_solution_for_any_shape(shape, dtype, tol):
    f, flow = rotation(dtype)
    y0 = torch.randn(*shape, 2, dtype=dtype, generator=torch.Generator().manual_seed(3))
    if shape == ():
        y0 = y0[0]  # a scalar state: y' = -0.3 y
        f, flow = (lambda t, y: -0.3 * y), (lambda y, dt: y * math.exp(-0.3 * dt))
    t = torch.tensor([0.0, 0.4, 2.0], dtype=dtype)
    ys = accel.odeint(f, y0, t, rtol=1e-8, atol=1e-10)
    assert ys.shape == (3, *y0.shape) and ys.dtype == dtype
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(ys[i], flow(y0, ti), rtol=tol, atol=tol)


def test_decreasing_times_integrate_backwards():
    f, flow = rotation()
    y0 = torch.randn(5, 2, dtype=F64)
    t = torch.tensor([2.0, 1.5, -1.0], dtype=F64)
    ys = accel.odeint(f, y0, t, rtol=1e-9, atol=1e-11)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(ys[i], flow(y0, ti - 2.0), rtol=1e-7, atol=1e-9)


def test_tuple_state_and_torchdiffeqs_tuple_norm():
    """A tuple state is solved as one; its error norm is the largest RMS over its tensors (torchdiffeq's), so the
    steps are torchdiffeq's even when one tensor is much larger than the other."""
    def f(t, y):
        x, v = y
        return v, -x - 0.1 * v
    y0 = (torch.tensor([1.0, 100.0], dtype=F64), torch.zeros(2, dtype=F64))
    t = torch.linspace(0, 3, 4, dtype=F64)
    count = {"accel": 0, "torchdiffeq": 0}

    def counted(name):
        return lambda t, y: count.__setitem__(name, count[name] + 1) or f(t, y)
    got = accel.odeint(counted("accel"), y0, t)
    want = torchdiffeq.odeint(counted("torchdiffeq"), y0, t)
    assert isinstance(got, tuple) and len(got) == 2 and got[0].shape == (4, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert count["accel"] == count["torchdiffeq"]


def test_func_gets_a_scalar_time():
    seen = []

    def jump(t, y):  # torchdiffeq's own test problem: Python control flow on t
        seen.append(t.shape)
        return -0.5 * y if t < 0.5 else y ** 2
    ys = accel.odeint(jump, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), options={"jump_t": [0.5]})
    assert set(seen) == {torch.Size([])}
    # up to 0.5: y0 exp(-t / 2); then y' = y^2: 1 / (1 / y(0.5) - (t - 0.5))
    mid = torch.tensor([1.0, 2.0]) * math.exp(-0.25)
    torch.testing.assert_close(ys[1], 1 / (1 / mid - 0.5), rtol=1e-5, atol=0)


def test_jump_t_and_step_t_end_steps_on_them():
    def jump(t, y):
        return -0.5 * y if t < 0.5 else y ** 2
    counts = []
    for options in ({}, {"jump_t": torch.tensor([0.5])}, {"step_t": torch.tensor([0.5])}):
        calls = []
        accel.odeint(lambda t, y: calls.append(float(t)) or jump(t, y), torch.tensor([1.0, 2.0]),
                     torch.tensor([0.0, 1.0]), rtol=1e-6, atol=1e-6, options=options)
        counts.append(len(calls))
        if options:  # a step ends on 0.5: some evaluation sits just below it
            assert any(0.5 - 1e-6 < c < 0.5 for c in calls)
    assert counts[1] < counts[0] and counts[2] < counts[0]


def test_closure_gradients_match_a_module_and_finite_differences():
    f = Field()
    A = f.A.detach().clone().requires_grad_()
    y0 = torch.randn(2, 4, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    w = torch.randn(3, 2, 4, dtype=F64)
    closure = accel.odeint(lambda t, y: torch.tanh(y @ A) + torch.sin(t), y0, t)
    grads = torch.autograd.grad((closure * w).sum(), (y0, A))
    module = accel.odeint(f, y0, t)
    want = torch.autograd.grad((module * w).sum(), (y0, f.A))
    for g, m in zip(grads, want):
        torch.testing.assert_close(g, m, rtol=1e-12, atol=1e-12)
    # finite differences of the solve (the step sizes move too, within the tolerance)
    eps = 1e-6
    direction = torch.randn(4, 4, dtype=F64)
    with torch.no_grad():
        up = accel.odeint(lambda t, y: torch.tanh(y @ (A + eps * direction)) + torch.sin(t), y0, t, rtol=1e-10,
                          atol=1e-12)
        down = accel.odeint(lambda t, y: torch.tanh(y @ (A - eps * direction)) + torch.sin(t), y0, t,
                            rtol=1e-10, atol=1e-12)
    numeric = ((up - down) * w).sum() / (2 * eps)
    torch.testing.assert_close((grads[1] * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_gradients_with_respect_to_the_times():
    """d y(t_i) / d t_i = f(t_i, y(t_i)) and d y(t_i) / d t0 = -exp(M (t_i - t0)) f(t0, y0), for a linear ODE."""
    f, flow = rotation()
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.2, 0.7, 1.5], dtype=F64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=F64)
    for solve in (accel.odeint, lambda *a, **k: accel.odeint_adjoint(*a, adjoint_params=(), **k),
                  lambda *a, **k: accel.odeint(*a, per_sample=True, options={"params": ()}, **k)):
        ys = solve(f, y0, t, rtol=1e-10, atol=1e-12)
        grad_y0, grad_t = torch.autograd.grad((ys * w).sum(), (y0, t))
        with torch.no_grad():
            want = torch.zeros(3, dtype=F64)
            for i in (1, 2):
                yi = flow(y0, t[i] - t[0])
                want[i] = (w[i] * f(t[i], yi)).sum()
                want[0] -= (w[i] * flow(f(t[0], y0), t[i] - t[0])).sum()
            M = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=F64)
            want_y0 = w[0] + sum(w[i] @ torch.linalg.matrix_exp(M * (t[i] - t[0])) for i in (1, 2))
        torch.testing.assert_close(grad_t, want, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(grad_y0, want_y0, rtol=1e-6, atol=1e-8)


def test_gradcheck_fixed_steps_and_through_the_interpolant():
    f = Field(d=2)
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.13, 0.3], dtype=F64)
    torch.autograd.gradcheck(lambda y, a: accel.odeint(lambda s, x: torch.tanh(x @ a), y, t, method="rk4",
                                                       options={"step_size": 0.05}), (y0, f.A))
    # huge tolerances: every step is accepted and grows by the largest factor, so the steps do not depend on the
    # inputs and backpropagation through them is the derivative of the computed outputs
    torch.autograd.gradcheck(lambda y, a: accel.odeint(lambda s, x: torch.tanh(x @ a), y, t, rtol=1e9, atol=1e9,
                                                       options={"first_step": 0.02}), (y0, f.A))


def test_adjoint_gradients_match_backpropagation_and_memory_does_not_grow_with_steps():
    f = Field()
    y0 = torch.randn(4, 4, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, 4, dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    backprop = torch.autograd.grad((accel.odeint(f, y0, t, rtol=1e-10, atol=1e-12) * w).sum(), (y0, f.A))
    adjoint = torch.autograd.grad((accel.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12) * w).sum(), (y0, f.A))
    for a, b in zip(adjoint, backprop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    saved = {}
    for rtol in (1e-3, 1e-9):  # many more steps at the tighter tolerance
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            accel.odeint_adjoint(f, y0, t, rtol=rtol, atol=rtol)
        saved[rtol] = sum(sizes)
    assert saved[1e-3] == saved[1e-9] == 3 * 16 + 16  # the solution at the output times, and A


def test_adjoint_of_a_closure_needs_adjoint_params():
    A = torch.randn(2, 2, dtype=F64, requires_grad=True)
    y0 = torch.randn(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = accel.odeint_adjoint(lambda t, y: y @ A, y0, t, rtol=1e-10, atol=1e-12, adjoint_params=(A,))
    (grad,) = torch.autograd.grad(ys[-1].sum(), A)
    (want,) = torch.autograd.grad(accel.odeint(lambda t, y: y @ A, y0, t, rtol=1e-10, atol=1e-12)[-1].sum(), A)
    torch.testing.assert_close(grad, want, rtol=1e-7, atol=1e-9)


def falling(t, state):
    height, speed = state
    return speed, torch.full_like(speed, -9.81)


def test_event_time_and_its_gradient():
    """A ball dropped from height h hits the ground at sqrt(2 h / g): d t / d h = 1 / (g t)."""
    h = torch.tensor(2.0, dtype=F64, requires_grad=True)
    state0 = (h, torch.tensor(0.0, dtype=F64))
    for interface in (accel.odeint, accel.odeint_adjoint):
        kwargs = {"adjoint_params": ()} if interface is accel.odeint_adjoint else {}
        event_t, (height, speed) = accel.odeint_event(falling, state0, torch.tensor(0.0, dtype=F64),
                                                      event_fn=lambda t, s: s[0], odeint_interface=interface,
                                                      **kwargs)
        exact = math.sqrt(2 * 2.0 / 9.81)
        torch.testing.assert_close(event_t, torch.tensor(exact, dtype=F64), rtol=1e-7, atol=1e-9)
        assert height.shape == (2,) and abs(float(height[-1].detach())) < 1e-7
        torch.testing.assert_close(speed[-1], torch.tensor(-9.81 * exact, dtype=F64), rtol=1e-7, atol=0)
        (grad,) = torch.autograd.grad(event_t, h)
        torch.testing.assert_close(grad, torch.tensor(1 / (9.81 * exact), dtype=F64), rtol=1e-6, atol=0)


def test_event_with_several_functions_stops_at_the_first():
    def events(t, y):
        return torch.stack([y - 0.5, t - 10.0])  # y decays through 0.5 long before t = 10
    event_t, ys = accel.odeint(lambda t, y: -y, torch.tensor(1.0, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                               event_fn=events)
    torch.testing.assert_close(event_t, torch.tensor(math.log(2.0), dtype=F64), rtol=1e-7, atol=0)


def test_options_min_step_max_step_norm_and_callbacks():
    f = Field()
    y0 = torch.randn(2, 4, dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    steps = []
    f.callback_step = lambda t, y, dt: steps.append(float(dt))
    _, stats = accel.odeint(f, y0, t, options={"max_step": 0.1}, return_stats=True)
    assert max(steps) <= 0.1 and stats["accepted"] >= 30
    steps.clear()
    _, coarse = accel.odeint(f, y0, t, options={"min_step": 1.0}, return_stats=True)
    assert min(steps) >= 1.0 and coarse["accepted"] <= 3
    seen = []
    norm = lambda x: seen.append(x.shape) or x.abs().max()  # noqa: E731
    accel.odeint(f, y0, t, options={"norm": norm})
    assert seen and set(seen) == {torch.Size([2, 4])}  # the user's norm sees the user's shape


def test_fixed_grid_perturb_and_grid_constructor():
    times = []
    accel.odeint(lambda t, y: times.append(float(t)) or -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4",
                 options={"step_size": 0.5, "perturb": True})
    assert 0.0 not in times and 0.5 not in times and 1.0 not in times
    grids = []
    ys = accel.odeint(lambda t, y: y, torch.tensor(1.0, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                      method="euler", options={"grid_constructor": lambda f, y0, t: grids.append(t) or
                                               torch.linspace(0, 1, 11, dtype=F64)})
    assert len(grids) == 1
    torch.testing.assert_close(ys[-1], torch.tensor(1.1 ** 10, dtype=F64), rtol=1e-12, atol=0)


def test_per_sample_times_have_the_shape_of_the_state():
    seen = []
    y0 = torch.zeros(4, 3, 2, dtype=F64)
    ys = accel.odeint(lambda t, y: seen.append(t.shape) or torch.cos(t).expand_as(y), y0,
                      torch.tensor([0.0, 1.0], dtype=F64), per_sample=True, rtol=1e-9, atol=1e-12)
    assert set(seen) == {torch.Size([4, 1, 1])}
    torch.testing.assert_close(ys[-1], torch.full_like(y0, math.sin(1.0)), rtol=1e-7, atol=1e-9)


def test_per_sample_time_spans_equal_solves_of_each_sample_alone():
    f = Field()
    y0 = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([[0.0, 1.0, -0.5], [0.4, 1.7, -1.0], [1.0, 2.0, -3.0]], dtype=F64)  # (T, B): one reversed
    with torch.no_grad():
        ys = accel.odeint(f, y0, t, per_sample=True, rtol=1e-9, atol=1e-11)
        for b in range(3):
            alone = accel.odeint(f, y0[b:b + 1], t[:, b], per_sample=True, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(ys[:, b], alone[:, 0], rtol=1e-12, atol=1e-13)
            default = accel.odeint(f, y0[b], t[:, b], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(ys[:, b], default, rtol=1e-7, atol=1e-8)


def test_per_sample_events_stop_each_sample_at_its_own_event():
    rates = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    y0 = torch.ones(3, 1, dtype=F64)
    with torch.no_grad():
        event_t, ys = accel.odeint(lambda t, y: -rates[:, None] * y, y0, torch.tensor([0.0], dtype=F64),
                                   event_fn=lambda t, y: y[:, 0] - 0.25, per_sample=True, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(event_t, math.log(4.0) / rates, rtol=1e-7, atol=0)
    torch.testing.assert_close(ys[-1, :, 0], torch.full((3,), 0.25, dtype=F64), rtol=1e-7, atol=0)
    for b in range(3):
        with torch.no_grad():
            alone_t, alone = accel.odeint(lambda t, y: -rates[b] * y, y0[b:b + 1], torch.tensor([0.0], dtype=F64),
                                          event_fn=lambda t, y: y[:, 0] - 0.25, per_sample=True, rtol=1e-9,
                                          atol=1e-11)
        # the batch bisects as often as its widest crossing step needs: the same event to within those roundings
        torch.testing.assert_close(event_t[b:b + 1], alone_t, rtol=1e-10, atol=0)
        torch.testing.assert_close(ys[:, b], alone[:, 0], rtol=1e-10, atol=0)


def test_per_sample_event_gradients_are_each_samples_own():
    """Balls dropped from heights h_b hit the ground at sqrt(2 h_b / g): d t_b / d h_b = 1 / (g t_b), and the
    speed there, -g t_b, moves with it."""
    heights = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]], dtype=F64, requires_grad=True)
    field = lambda t, s: torch.stack([s[:, 1], torch.full_like(s[:, 1], -9.81)], 1)  # noqa: E731
    event_t, states = accel.odeint(field, heights, torch.tensor([0.0], dtype=F64), event_fn=lambda t, s: s[:, 0],
                                   per_sample=True, rtol=1e-10, atol=1e-12, options={"params": ()})
    exact = torch.sqrt(2 * heights[:, 0].detach() / 9.81)
    torch.testing.assert_close(event_t, exact, rtol=1e-8, atol=0)
    (grad,) = torch.autograd.grad(event_t.sum(), heights, retain_graph=True)
    torch.testing.assert_close(grad[:, 0], 1 / (9.81 * exact), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(states[-1, :, 1].sum(), heights)  # the speed at impact, -g t_b
    torch.testing.assert_close(grad[:, 0], -9.81 / (9.81 * exact), rtol=1e-6, atol=0)


def test_adjoint_norm_options():
    """The adjoint's error norm: a callable sees torchdiffeq's tuple in the user's shapes; 'seminorm' leaves the
    parameters' gradients out of the control, so the adjoint solve takes no more steps than with them in."""
    f = Field(d=2)
    state0 = (torch.tensor(1.0, dtype=F64), torch.randn(2, 2, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    tuple_f = lambda s, y: (-y[0], f(s, y[1]))  # noqa: E731
    seen = []

    def norm(parts):
        seen.append(tuple(p.shape for p in parts))
        return max(p.abs().max() for p in parts)
    ys = accel.odeint_adjoint(tuple_f, state0, t, adjoint_params=(f.A,), adjoint_options={"norm": norm})
    ys[1].sum().backward()
    assert seen and set(seen) == {((), (), (2, 2), (), (2, 2), (2, 2))}
    counts = {}
    for choice in (None, "seminorm"):
        calls = []
        counted = lambda s, y: calls.append(1) or f(s, y)  # noqa: E731
        ys = accel.odeint_adjoint(counted, state0[1], t, rtol=1e-9, atol=1e-9, adjoint_params=(f.A,),
                                  adjoint_options=None if choice is None else {"norm": choice})
        forward = len(calls)
        ys.sum().backward()
        counts[choice] = len(calls) - forward
    assert counts["seminorm"] <= counts[None]
