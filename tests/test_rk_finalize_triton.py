"""The Triton path of rk_finalize (kernels/rk_finalize.py), run on CPU tensors under TRITON_INTERPRET=1, judged by
the numerics rule against accel.reference.ode's error_norm and stiffness (the error estimate err = h sum_i b_err[i]
k[i] by ode.combination) and their autograd gradients, run in float64 and in the kernels' dtype on the same
rounded inputs."""
import pytest
import torch

from accel.reference import ode
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("rk_finalize")

NAMES = ["error_norm", "stiffness", "grad y0", "grad y1", "grad k", "grad g_prev", "grad h"]
# (b_err, rtol, atol): DOPRI5's (one zero weight), Tsit5's, more than 8 nonzero weights, all zero
WEIGHTS = [(list(ode.DOPRI5.b_err), 1e-3, 1e-6), (list(ode.TSIT5.b_err), 1e-6, 1e-8),
           ([0.1, -0.2, 0.05, 0.3, -0.1, 0.2, -0.3, 0.15, 0.1, -0.05], 1e-2, 0.0), ([0.0] * 7, 0.0, 1e-4)]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(s, B, D, dtype=torch.float64):
    """y0, y1, k, g_prev, h (rounded to dtype) and the gradients of the two outputs."""
    y0 = torch.randn(B, D, dtype=torch.float64)
    y1 = y0 + 0.1 * torch.randn(B, D, dtype=torch.float64)
    k = torch.randn(s, B, D, dtype=torch.float64)
    g_prev = y0 + 0.1 * torch.randn(B, D, dtype=torch.float64)
    h = torch.rand(B, dtype=torch.float64) * 0.1 + 0.01
    grads = (torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64))
    return [t.to(dtype) for t in (y0, y1, k, g_prev, h)], [g.to(dtype) for g in grads]


def reference(args, grads, b_err, rtol, atol):
    """[norm, rho, *gradients w.r.t. (y0, y1, k, g_prev, h)] of the reference in the inputs' dtype."""
    y0, y1, k, g_prev, h = leaves = [t.detach().clone().requires_grad_() for t in args]
    norm = ode.error_norm(h[:, None] * ode.combination(k, b_err), y0, y1, rtol, atol)
    rho = ode.stiffness(k, torch.stack([g_prev, y1]))
    gradients = torch.autograd.grad([norm, rho], leaves, grads, allow_unused=True, materialize_grads=True)
    return [norm.detach(), rho.detach(), *gradients]


def run(args, grads, b_err, rtol, atol):
    """The kernels' [norm, rho, *gradients]."""
    return [*kernels.forward(*args, b_err, rtol, atol), *kernels.backward(*grads, *args, b_err, rtol, atol)]


def judge(fast, args, grads, b_err, rtol, atol):
    in_dtype = reference(args, grads, b_err, rtol, atol)
    ref64 = reference([t.double() for t in args], [g.double() for g in grads], b_err, rtol, atol)
    for name, f, r, r64 in zip(NAMES, fast, in_dtype, ref64, strict=True):
        assert f.dtype == args[0].dtype, name
        assert_by_rule(f, r, r64, f"{name} {f.dtype} b_err={b_err}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 40])
@pytest.mark.parametrize("weights", range(len(WEIGHTS)))
def test_forward_and_backward_follow_the_numerics_rule(B, D, weights, dtype):
    b_err, rtol, atol = WEIGHTS[weights]
    args, grads = inputs(len(b_err), B, D, dtype)
    judge(run(args, grads, b_err, rtol, atol), args, grads, b_err, rtol, atol)


def test_zero_stiffness_denominator_gives_zero_and_zero_gradients():
    (y0, y1, k, g_prev, h), grads = inputs(7, 4, 9)
    g_prev[1] = y1[1]  # sample 1: y1 - g_prev = 0
    args, constants = (y0, y1, k, g_prev, h), (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    fast = run(args, grads, *constants)
    assert fast[1][1] == 0 and torch.isfinite(torch.cat([g.flatten() for g in fast])).all()
    judge(fast, args, grads, *constants)


def test_a_nan_stage_input_gives_nan_stiffness_and_gradients():
    (y0, y1, k, g_prev, h), grads = inputs(7, 4, 9)
    g_prev[2, 3] = float("nan")  # sample 2 only
    args, constants = (y0, y1, k, g_prev, h), (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    fast = run(args, grads, *constants)
    assert fast[1][2].isnan() and torch.isfinite(fast[1][[0, 1, 3]]).all()
    assert fast[2 + 1][2].isnan().all() and torch.isfinite(fast[2 + 1][[0, 1, 3]]).all()  # dL/dy1
    judge(fast, args, grads, *constants)  # NaN exactly where the reference has NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stiffness_of_a_linear_field_is_the_eigenvalue_modulus(dtype):
    # f(y) = lambda y: k[s-1] - k[s-2] = lambda (y1 - g_prev), so rho = |lambda|, per sample
    lam = torch.tensor([-3.0, 0.5, -250.0, 7.25], dtype=torch.float64)
    (y0, y1, _, g_prev, h), grads = inputs(7, 4, 13, dtype)
    k = torch.randn(7, 4, 13, dtype=torch.float64).to(dtype)
    k[6], k[5] = (lam[:, None] * y1.double()).to(dtype), (lam[:, None] * g_prev.double()).to(dtype)
    args, constants = (y0, y1, k, g_prev, h), (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    fast = run(args, grads, *constants)
    judge(fast, args, grads, *constants)
    # and against the eigenvalue itself, up to the rounding of k to dtype
    torch.testing.assert_close(fast[1], lam.abs().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs_and_longer_rows(dtype):
    args, grads = inputs(7, 3, 300, dtype)  # D > the largest D block: both loops run over pieces of the row
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in args]
    constants = (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    judge(run(strided, grads, *constants), strided, grads, *constants)


def test_every_output_element_is_written(poisoned_outputs):
    args, grads = inputs(7, 35, 150, torch.float32)  # partial tiles on both axes
    constants = (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    fast = run(args, grads, *constants)
    assert all(torch.isfinite(t).all() for t in fast)
    judge(fast, args, grads, *constants)
