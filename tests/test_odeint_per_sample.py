"""accel.odeint with per_sample=True: against the per-sample reference solver (accel/reference/ode.py: same
decisions, same solution), scipy's solve_ivp RK45 (the same Dormand-Prince pair) on Van der Pol, Lotka-Volterra and
a linear system, torchdiffeq's dopri5 on a neural ODE, per-sample step sizes, output times, the stiffness estimate,
the discrete adjoint's gradients, and clear errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import accel
from accel.reference import ode as reference

scipy_integrate = pytest.importorskip("scipy.integrate")


def van_der_pol(t, y, mu=1.0):
    return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)


def lotka_volterra(t, y):
    return torch.stack([1.5 * y[:, 0] - y[:, 0] * y[:, 1], -3.0 * y[:, 1] + y[:, 0] * y[:, 1]], -1)


def as_numpy(f):
    return lambda t, y: f(torch.tensor([t]), torch.tensor(y)[None])[0].numpy()


def per_sample(func, y0, t, method="dopri5", rtol=1e-6, atol=1e-8, regularization=None, return_stats=False,
               **options):
    """accel.odeint with per_sample=True, its solver options as keywords."""
    return accel.odeint(func, y0, t, method=method, rtol=rtol, atol=atol, options=options, per_sample=True,
                        regularization=regularization, return_stats=return_stats)


class MLP(nn.Module):
    def __init__(self, d=2, hidden=16, dtype=torch.float64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(dtype)

    def forward(self, t, y):
        return self.net(y)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("controller", ["I", "PI"])
def test_takes_the_reference_solvers_steps(method, controller):
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.1, -3.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 2.5, 4.0], dtype=torch.float64)
    ys, stats = per_sample(van_der_pol, y0, t, method, rtol=1e-6, atol=1e-8, controller=controller,
                             dense_output=False, return_stats=True)  # the reference shortens steps to output times
    want, want_stats = reference.odeint(van_der_pol, y0, t, method, rtol=1e-6, atol=1e-8, controller=controller)
    torch.testing.assert_close(ys, want, rtol=1e-9, atol=1e-11)
    assert stats["accepted"].tolist() == want_stats["accepted"]
    assert stats["rejected"].tolist() == want_stats["rejected"]
    for b in range(3):  # the error and stiffness estimates of every accepted step, in order; both are built
        kept = stats["step_accepted"][:, b]  # from differences of stages, whose cancellation amplifies rounding
        # (measured here: relative differences up to 6.6e-6 for the error norms, 3.3e-6 for the stiffness)
        torch.testing.assert_close(stats["error"][kept, b].clamp_min(1e-10),
                                   torch.tensor(want_stats["error"][b], dtype=torch.float64), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(stats["stiffness"][kept, b], torch.tensor(want_stats["stiffness"][b],
                                                                             dtype=torch.float64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("problem, y0, t1", [
    (van_der_pol, [2.0, 0.0], 10.0), (lotka_volterra, [1.0, 1.0], 10.0)])
def test_against_scipy_rk45(problem, y0, t1):
    y0 = torch.tensor([y0], dtype=torch.float64)
    t = torch.linspace(0, t1, 5, dtype=torch.float64)
    ys, stats = per_sample(problem, y0, t, rtol=1e-6, atol=1e-8, return_stats=True)
    exact = scipy_integrate.solve_ivp(as_numpy(problem), (0, t1), y0[0].numpy(), method="DOP853", t_eval=t.numpy(),
                                      rtol=1e-12, atol=1e-12).y.T
    rk45 = scipy_integrate.solve_ivp(as_numpy(problem), (0, t1), y0[0].numpy(), method="RK45", t_eval=t.numpy(),
                                     rtol=1e-6, atol=1e-8)
    ours, theirs = np.abs(ys[:, 0].numpy() - exact).max(), np.abs(rk45.y.T - exact).max()
    # The same pair and controller: over 100 random initial conditions (Van der Pol in [-2.5, 2.5]^2,
    # Lotka-Volterra in [0.5, 2]^2) our error / RK45's had median 1.00 and max 1.65 and 1.41, the evaluations
    # 0.96 to 1.07 times RK45's
    assert ours <= 2 * theirs + 1e-9, f"error {ours:.2e}, scipy RK45 {theirs:.2e}"
    assert 0.9 * rk45.nfev <= stats["nfe"] <= 1.1 * rk45.nfev


def test_linear_system_float32_within_tolerance():
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    y0 = torch.randn(33, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    ys = per_sample(lambda t, y: y @ A.T.to(y.dtype), y0.float(), t.float(), rtol=1e-5, atol=1e-6)
    for i, ti in enumerate(t):
        exact = y0 @ torch.linalg.matrix_exp(A * ti).T
        torch.testing.assert_close(ys[i].double(), exact, rtol=2e-4, atol=2e-5)


def test_each_sample_steps_on_its_own():
    rates = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)  # y' = -rate y: stiffer samples need more steps
    y0 = torch.ones(3, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    ys, stats = per_sample(lambda t, y: -rates[:, None] * y, y0, t, rtol=1e-7, atol=1e-9, return_stats=True)
    torch.testing.assert_close(ys[1, :, 0], torch.exp(-2 * rates), rtol=1e-5, atol=1e-9)
    accepted = stats["accepted"].tolist()
    assert accepted[0] < accepted[1] < accepted[2]
    for b in range(3):
        one = per_sample(lambda t, y: -rates[b] * y, y0[b:b + 1], t, rtol=1e-7, atol=1e-9, return_stats=True)[1]
        assert one["accepted"].item() == accepted[b]


def test_stiffness_estimate_is_the_eigenvalue_modulus():
    lam = -7.5
    y0 = torch.tensor([[1.0]], dtype=torch.float64)
    _, stats = per_sample(lambda t, y: lam * y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            return_stats=True)
    rho = stats["stiffness"][stats["step_accepted"][:, 0], 0]
    torch.testing.assert_close(rho, torch.full_like(rho, abs(lam)))


def test_outputs_at_every_requested_time_and_a_single_time():
    t = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    ys = per_sample(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ys, y0[None] * torch.exp(-t)[:, None, None], rtol=1e-7, atol=1e-12)
    only = per_sample(lambda t, y: -y, y0, t[:1])
    assert only.shape == (1, 2, 1) and torch.equal(only[0], y0)
    flat = per_sample(lambda t, y: -y, y0[0], t, rtol=1e-9, atol=1e-12)  # a 1-D state is a batch of one
    torch.testing.assert_close(flat, ys[:, 0])


def test_time_dependent_right_hand_side_gets_per_sample_times():
    y0 = torch.zeros(4, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ys = per_sample(lambda t, y: torch.cos(t).expand_as(y), y0, t, rtol=1e-9, atol=1e-12)  # t: (B, 1)
    torch.testing.assert_close(ys[:, :, 0], torch.sin(t)[:, None].expand(3, 4), rtol=1e-7, atol=1e-10)


def test_rk4_takes_fixed_steps():
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    f = lambda t, y: torch.stack([y[:, 1], -y[:, 0]], -1)  # noqa: E731
    ys, stats = per_sample(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), "rk4", step_size=0.01,
                             return_stats=True)
    assert stats["accepted"].item() == 100 and stats["nfe"] == 1 + 100 * 4
    torch.testing.assert_close(ys[1, 0], torch.tensor([math.cos(1.0), -math.sin(1.0)], dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


def test_against_torchdiffeq_on_a_neural_ode():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(1)
    func = MLP(d=4, hidden=32)
    y0 = torch.randn(1, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    calls = []
    counted = lambda t, y: calls.append(1) or func(t, y)  # noqa: E731
    want = torchdiffeq.odeint(counted, y0, t, method="dopri5", rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        ys, stats = per_sample(func, y0, t, rtol=1e-6, atol=1e-8, return_stats=True)
    torch.testing.assert_close(ys, want, rtol=1e-5, atol=1e-7)
    assert abs(stats["nfe"] - len(calls)) <= 0.1 * len(calls)


def replay(func, y0, t, stats_steps, method="dopri5"):
    """The solution after the given accepted steps, through plain autograd: what the discrete adjoint must match."""
    tableau = reference.METHODS[method]
    y, tt = y0, torch.full((y0.shape[0],), float(t[0]), dtype=y0.dtype)
    for h in stats_steps:
        y, _, _, _ = reference.rk_step(func, tt, y, h, tableau)
        tt = tt + h
    return y


def test_gradients_are_the_discrete_adjoint_of_the_steps_taken():
    torch.manual_seed(2)
    func = MLP(d=3, hidden=8)
    y0 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    solver_grads = torch.autograd.grad(per_sample(func, y0, t, dense_output=False)[-1].sum(), [y0, *func.parameters()])
    # the accepted steps' sizes, read off a run with the trace kept
    from accel.ode.per_sample import _Solver
    solver = _Solver(func, reference.DOPRI5, t, 1e-6, 1e-8, "I", 0.9, None, None, 0.0, 1000, 1, dense_output=False)
    with torch.no_grad():
        solver.solve(y0.detach(), keep_trace=True)
    steps = [it.step for it in solver.trace if bool(it.accepted.all())]
    assert len(steps) == len(solver.trace) - int(solver.stats["rejected"].sum())
    want = torch.autograd.grad(replay(func, y0, t, steps).sum(), [y0, *func.parameters()])
    for g, w in zip(solver_grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradients_approach_the_exact_sensitivity():
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=torch.float64)
    y0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 2.0], dtype=torch.float64)
    ys = per_sample(lambda t, y: y @ A.T, y0, t, rtol=1e-10, atol=1e-12, params=())
    weights = torch.randn(3, 5, 2, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ys * weights).sum(), y0)
    want = sum(weights[i] @ torch.linalg.matrix_exp(A * ti) for i, ti in enumerate(t))
    torch.testing.assert_close(grad, want, rtol=1e-7, atol=1e-9)


def test_gradcheck_with_fixed_steps():
    torch.manual_seed(3)
    func = MLP(d=2, hidden=4)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.1, 0.25], dtype=torch.float64)
    weight = func.net[0].weight
    torch.autograd.gradcheck(lambda y, w: per_sample(func, y, t, "rk4", step_size=0.05), (y0, weight))


def test_min_step_underflow_names_the_sample_and_time():
    y0 = torch.tensor([[0.5], [1.0]], dtype=torch.float64)  # y' = y^2 blows up at t = 1 / y0: sample 1 first
    with pytest.raises(RuntimeError, match=r"step size underflowed .* for sample 1 at t = 0\.99"):
        per_sample(lambda t, y: y * y, y0, torch.tensor([0.0, 1.5], dtype=torch.float64), min_step=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="dopri8"), "`method` must be one of"),
    (dict(rtol=-1.0), "`rtol` must be a finite number"),
    (dict(atol=math.nan), "`atol` must be a finite number"),
    (dict(rtol=0.0, atol=0.0), "cannot both be 0"),
    (dict(controller="PID"), "`controller` must be one of"),
    (dict(max_num_steps=0), "`max_num_steps` must be an int"),
    (dict(t=torch.tensor([0.0, 1.0, 0.5])), "strictly increasing or strictly decreasing"),
    (dict(t=torch.zeros(2, 3)), "`t` of shape \\(T, B\\) must have B = 2"),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    args = dict(y0=torch.zeros(2, 3), t=torch.tensor([0.0, 1.0]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        per_sample(lambda t, y: -y, **args)


def test_a_closure_with_grad_needs_params_and_max_steps_is_enforced():
    y0 = torch.ones(2, 1, requires_grad=True)
    with pytest.raises(ValueError, match=r"`options\['params'\]` must list"):
        per_sample(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="more than max_num_steps=2"):
        per_sample(lambda t, y: -y, y0.detach(), torch.tensor([0.0, 100.0]), max_num_steps=2, first_step=0.01)


def test_checking_termination_every_few_iterations_changes_nothing():
    y0 = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    every, stats_every = per_sample(van_der_pol, y0, t, check_every=1, return_stats=True)
    sparse, stats_sparse = per_sample(van_der_pol, y0, t, check_every=5, return_stats=True)
    assert torch.equal(every, sparse)  # finished samples ride along unchanged
    assert torch.equal(stats_every["accepted"], stats_sparse["accepted"])
    assert stats_sparse["iterations"] >= stats_every["iterations"]


def test_the_backward_keeps_one_state_per_iteration_and_autograd_sees_it():
    func = MLP(d=3, hidden=8)
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ys, stats = per_sample(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), return_stats=True)
    per_iteration = 5 * 3 + 5 * 5  # the state, and per sample its time, step, acceptance and output rows written
    params = sum(p.numel() for p in func.parameters())
    assert sum(saved) == params + stats["iterations"] * per_iteration


def test_dense_output_does_not_add_steps_for_more_output_times():
    y0 = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    few = torch.tensor([0.0, 5.0], dtype=torch.float64)
    many = torch.linspace(0, 5, 60, dtype=torch.float64)
    _, few_stats = per_sample(van_der_pol, y0, few, return_stats=True)
    ys, many_stats = per_sample(van_der_pol, y0, many, return_stats=True)
    assert torch.equal(few_stats["accepted"], many_stats["accepted"])
    _, clipped = per_sample(van_der_pol, y0, many, dense_output=False, return_stats=True)
    assert (clipped["accepted"] > many_stats["accepted"]).all()
    for b in range(2):  # the interpolant is within the tolerance's reach of the exact solution
        exact = scipy_integrate.solve_ivp(as_numpy(van_der_pol), (0, 5), y0[b].numpy(), method="DOP853",
                                          t_eval=many.numpy(), rtol=1e-12, atol=1e-12).y.T
        assert np.abs(ys[:, b].numpy() - exact).max() < 2e-5


def test_gradcheck_through_dense_output():
    # huge tolerances: every step is accepted and grows by the largest factor, so the step sequence does not
    # depend on y0 and the discrete adjoint is the exact derivative of the computed outputs
    torch.manual_seed(4)
    func = MLP(d=2, hidden=4)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.013, 0.05, 0.3, 0.31], dtype=torch.float64)
    weight = func.net[2].weight
    torch.autograd.gradcheck(lambda y, w: per_sample(func, y, t, rtol=1e9, atol=1e9, first_step=0.02), (y0, weight))


def replay_regularizer(func, y0, trace, kind, tableau=reference.DOPRI5, sample=0):
    """ERNODE's sum of norm x h, or STRNODE's largest |h rho| / bound, over the accepted steps of a trace, through
    plain autograd and the reference's error norm and stiffness estimate, for one sample of the batch: y0 (1, D)."""
    y, terms = y0, []
    for it in trace:
        if not bool(it.accepted[sample]):
            continue
        t, step = it.t[sample:sample + 1], it.step[sample:sample + 1]
        y1, err, k, g = reference.rk_step(func, t, y, step, tableau)
        if kind == "error":
            terms.append(reference.error_norm(err, y, y1, 1e-6, 1e-8) * step)
        else:
            terms.append((step * reference.stiffness(k, g)).abs() / tableau.stability_bound)
        y = y1
    stacked = torch.stack(terms)
    return stacked.sum(0) if kind == "error" else stacked.max(0).values


@pytest.mark.parametrize("kind", ["error", "stiffness"])
def test_regularizers_and_their_gradients_follow_the_steps_taken(kind):
    from accel.ode.per_sample import _Solver
    torch.manual_seed(5)
    func = MLP(d=3, hidden=8)
    y0 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    _, reg = per_sample(func, y0, t, dense_output=False, regularization=kind)
    got = torch.autograd.grad(reg.sum(), [y0, *func.parameters()])
    solver = _Solver(func, reference.DOPRI5, t, 1e-6, 1e-8, "I", 0.9, None, None, 0.0, 1000, 1, dense_output=False)
    with torch.no_grad():
        solver.solve(y0.detach(), keep_trace=True)
    want_reg = replay_regularizer(func, y0, solver.trace, kind)
    torch.testing.assert_close(reg, want_reg.detach(), rtol=1e-6, atol=0)
    want = torch.autograd.grad(want_reg.sum(), [y0, *func.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)


def test_regularizer_with_dense_output_and_the_solution_together():
    func = MLP(d=2, hidden=8)
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ys, reg, stats = per_sample(func, y0, t, regularization="error", return_stats=True)
    assert reg.shape == (4,) and (reg > 0).all()
    # each sample's regularizer and its gradient: the sum over the steps it took (stepping past the output
    # times, whose values are interpolated), replayed through plain autograd
    from accel.ode.per_sample import _Solver
    solver = _Solver(func, reference.DOPRI5, t, 1e-6, 1e-8, "I", 0.9, None, None, 0.0, 1000, 1, dense_output=True)
    with torch.no_grad():
        solver.solve(y0.detach(), keep_trace=True)
    assert torch.equal(solver.stats["accepted"], stats["accepted"])
    want = torch.cat([replay_regularizer(func, y0[b:b + 1], solver.trace, "error", sample=b) for b in range(4)])
    torch.testing.assert_close(reg, want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(reg.sum(), y0, retain_graph=True)[0],
                               torch.autograd.grad(want.sum(), y0)[0], rtol=1e-6, atol=1e-12)
    plain = per_sample(func, y0, t)
    torch.testing.assert_close(ys, plain)
    # the two gradients add up: the regularizer's gradient is what it adds to the solution's
    both = torch.autograd.grad(ys.sum() + reg.sum(), y0)[0]
    only_ys = torch.autograd.grad(plain.sum(), y0)[0]
    only_reg = torch.autograd.grad(per_sample(func, y0, t, regularization="error")[1].sum(), y0)[0]
    torch.testing.assert_close(both, only_ys + only_reg)
    assert only_reg.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(regularization="kinetic"), "`regularization` must be one of"),
    (dict(method="rk4", step_size=0.1, regularization="error"), "no error estimate"),
    (dict(method="bosh3", regularization="stiffness"), "no stability bound"),
])
def test_bad_regularizations_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        per_sample(lambda t, y: -y, torch.zeros(2, 3), torch.tensor([0.0, 1.0]), **kwargs)


@pytest.mark.parametrize("method, kind", [("dopri5", "error"), ("tsit5", "stiffness"), ("bosh3", "error")])
def test_local_regularizer_is_one_steps_estimate(method, kind):
    from accel.ode import local_regularizer
    torch.manual_seed(6)
    func = MLP(d=3, hidden=8)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, dtype=torch.float64)
    h = torch.rand(4, dtype=torch.float64) * 0.2 + 0.05
    got = local_regularizer(func, t, y, h, method, kind)
    tableau = reference.METHODS[method]
    y1, err, k, g = reference.rk_step(func, t, y, h, tableau)
    want = (reference.error_norm(err, y, y1, 1e-6, 1e-8) if kind == "error"
            else (h * reference.stiffness(k, g)).abs() / tableau.stability_bound)
    # the estimates are differences of stages: their cancellation amplifies the rounding of the stage sums
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), [y, *func.parameters()]),
                    torch.autograd.grad(want.sum(), [y, *func.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * b.abs().max().item())
    default_h = local_regularizer(func, t, y, None, method, kind)  # Hairer's starting step, a constant
    with torch.no_grad():
        h0 = reference.initial_step(func, t, y, func(t, y), tableau.error_order, 1e-6, 1e-8)
        y1, err, k, g = reference.rk_step(func, t, y, h0, tableau)
        if kind == "error":
            want = reference.error_norm(err, y, y1, 1e-6, 1e-8)
            # at the small starting step the error estimate h sum_i e_i k_i cancels to about 1e-11 of its terms:
            # judged against their size (the error norm of the sum of |h e_i k_i|), to a few float64 roundings
            scaled = sum(abs(e) * ki.abs() for e, ki in zip(tableau.b_err, k)) * h0[:, None]
            tolerance = 8 * torch.finfo(torch.float64).eps * reference.error_norm(scaled, y, y1, 1e-6, 1e-8)
        else:
            want = (h0 * reference.stiffness(k, g)).abs() / tableau.stability_bound
            tolerance = 1e-6 * want
        assert want.min() > 0 and ((default_h - want).abs() <= tolerance).all(), (default_h, want)
    with pytest.raises(ValueError, match="adaptive method"):
        local_regularizer(func, t, y, h, "rk4")
