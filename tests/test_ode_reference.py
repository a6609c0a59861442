"""accel.reference.ode, the reference for the adaptive solver: solutions against scipy's solve_ivp (RK45, the same
Dormand-Prince pair) and a tight DOP853 solution on Van der Pol and on a linear system with a known solution,
comparable step counts, Tsit5's fifth order by its error slope, and the stiffness estimate on y' = lambda y."""
import math

import numpy as np
import pytest
import torch

from accel.reference import ode

scipy_integrate = pytest.importorskip("scipy.integrate")


def van_der_pol(t, y, mu=1.0):
    return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)


def van_der_pol_np(t, y, mu=1.0):
    return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_van_der_pol_against_scipy(method):
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(0, 10, 6, dtype=torch.float64)
    ys, stats = ode.odeint(van_der_pol, y0, t, method=method, rtol=1e-6, atol=1e-8)
    for b in range(2):
        exact = scipy_integrate.solve_ivp(van_der_pol_np, (0, 10), y0[b].numpy(), method="DOP853",
                                          t_eval=t.numpy(), rtol=1e-12, atol=1e-12).y.T
        rk45 = scipy_integrate.solve_ivp(van_der_pol_np, (0, 10), y0[b].numpy(), method="RK45", t_eval=t.numpy(),
                                         rtol=1e-6, atol=1e-8)
        ours = np.abs(ys[:, b].numpy() - exact).max()
        theirs = np.abs(rk45.y.T - exact).max()
        assert ours <= 3 * theirs + 1e-9, f"{method}: error {ours:.2e}, scipy RK45 {theirs:.2e}"
        if method == "dopri5":  # the same pair: comparable work
            assert 0.7 * rk45.nfev <= stats["nfe"][b] <= 1.3 * rk45.nfev


def test_linear_system_with_known_solution():
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)  # a damped rotation
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    for method in ("dopri5", "tsit5"):
        ys, _ = ode.odeint(lambda t, y: y @ A.T, y0, t, method=method, rtol=1e-8, atol=1e-10)
        for i, ti in enumerate(t):
            exact = y0 @ torch.linalg.matrix_exp(A * ti).T
            torch.testing.assert_close(ys[i], exact, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, order", [("tsit5", 5), ("dopri5", 5), ("rk4", 4), ("bosh3", 3)])
def test_convergence_order_from_the_error_slope(method, order):
    f = lambda t, y: torch.stack([y[:, 1], -y[:, 0]], -1)  # noqa: E731
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    tableau = ode.METHODS[method]
    errors = []
    for n in (8, 16):
        h = torch.full((1,), 1.0 / n, dtype=torch.float64)
        y, t = y0, torch.zeros(1, dtype=torch.float64)
        for _ in range(n):
            y, _, _, _ = ode.rk_step(f, t, y, h, tableau)
            t = t + h
        errors.append((y - torch.tensor([[math.cos(1.0), -math.sin(1.0)]], dtype=torch.float64)).norm().item())
    slope = math.log2(errors[0] / errors[1])
    assert order - 0.3 <= slope <= order + 0.6, f"{method}: slope {slope:.2f}"


@pytest.mark.parametrize("lam", [-50.0, -3.0])
def test_stiffness_estimate_is_the_eigenvalue_modulus(lam):
    _, stats = ode.odeint(lambda t, y: lam * y, torch.ones(2, 3, dtype=torch.float64),
                          torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5")
    for rho in stats["stiffness"]:
        np.testing.assert_allclose(rho, abs(lam), rtol=1e-9)


@pytest.mark.parametrize("method, scipy_method", [("dopri5", "RK45"), ("bosh3", "RK23")])
def test_dense_output_is_scipys(method, scipy_method):
    y0 = np.array([2.0, 0.0])
    solver = getattr(scipy_integrate, scipy_method)(van_der_pol_np, 0.0, y0, 10.0, rtol=1e-6, atol=1e-8)
    solver.step()
    solver.step()  # a step that is not the first
    dense = solver.dense_output()
    h = torch.tensor([solver.t - solver.t_old], dtype=torch.float64)
    y = torch.tensor(solver.y_old)[None]
    _, _, k, _ = ode.rk_step(van_der_pol, torch.tensor([solver.t_old]), y, h, ode.METHODS[method])
    for theta in (0.0, 0.3, 0.77, 1.0):
        got = ode.interpolate(y, k, h, torch.tensor([theta], dtype=torch.float64), ode.METHODS[method])
        np.testing.assert_allclose(got[0].numpy(), dense(solver.t_old + theta * h.item()), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method, slope", [("dopri5", 4.8), ("tsit5", 4.8), ("bosh3", 3.8), ("adaptive_heun", 2.8),
                                           ("fehlberg2", 2.8)])
def test_dense_output_error_falls_with_the_step_as_its_order(method, slope):
    """The interpolant at mid-step: dopri5's and tsit5's quartic through a 4th-order midpoint (local error h^5),
    the cubic Hermite of the others (h^4), against a tight DOP853 solution, for three step sizes."""
    tableau = ode.METHODS[method]
    y = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    errors = []
    for h in (0.2, 0.1, 0.05):
        step = torch.tensor([h], dtype=torch.float64)
        y1, _, k, _ = ode.rk_step(van_der_pol, torch.zeros(1, dtype=torch.float64), y, step, tableau)
        if not tableau.fsal:  # the end slope f(t1, y1) closes the interpolant
            k = torch.cat([k, van_der_pol(step, y1)[None]])
        got = ode.interpolate(y, k, step, torch.tensor([0.5], dtype=torch.float64), tableau)
        exact = scipy_integrate.solve_ivp(van_der_pol_np, (0, h / 2), y[0].numpy(), method="DOP853", rtol=1e-13,
                                          atol=1e-14).y[:, -1]
        errors.append(np.abs(got[0].numpy() - exact).max())
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) >= slope, errors
