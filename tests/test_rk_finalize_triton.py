"""The Triton path of rk_finalize (kernels/rk_finalize.py), run on CPU tensors under TRITON_INTERPRET=1, against
the op's reference kernels (accel/ops/rk_finalize.py) by the numerics rule."""
import importlib

import pytest
import torch

from accel.reference import ode
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("rk_finalize")
op = importlib.import_module("accel.ops.rk_finalize")  # the module: accel.ops.rk_finalize is also the function

NAMES = ["error_norm", "stiffness", "grad y0", "grad y1", "grad k", "grad g_prev", "grad h"]
# (b_err, rtol, atol): DOPRI5's (one zero weight), Tsit5's, more than 8 nonzero weights, all zero
WEIGHTS = [(list(ode.DOPRI5.b_err), 1e-3, 1e-6), (list(ode.TSIT5.b_err), 1e-6, 1e-8),
           ([0.1, -0.2, 0.05, 0.3, -0.1, 0.2, -0.3, 0.15, 0.1, -0.05], 1e-2, 0.0), ([0.0] * 7, 0.0, 1e-4)]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(s, B, D, dtype=torch.float64):
    y0 = torch.randn(B, D, dtype=dtype)
    y1 = y0 + 0.1 * torch.randn(B, D, dtype=dtype)
    k = torch.randn(s, B, D, dtype=dtype)
    g_prev = y0 + 0.1 * torch.randn(B, D, dtype=dtype)
    h = torch.rand(B, dtype=dtype) * 0.1 + 0.01
    return y0, y1, k, g_prev, h


def both(module, args, grads):
    """[norm, rho, *gradients] by module's forward and backward."""
    if module is op:
        return [*op._reference_forward(*args), *op._reference_backward(*grads, *args)]
    return [*module.forward(*args), *module.backward(*grads, *args)]


@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 40])
@pytest.mark.parametrize("weights", range(len(WEIGHTS)))
def test_forward_and_backward_match_the_reference_by_the_numerics_rule(B, D, weights):
    b_err, rtol, atol = WEIGHTS[weights]
    args64 = (*inputs(len(b_err), B, D), b_err, rtol, atol)
    grads64 = (torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64))
    ref64 = both(op, args64, grads64)
    for dtype in (torch.float32, torch.float64):
        args = (*(t.to(dtype) for t in args64[:5]), *args64[5:])
        grads = tuple(g.to(dtype) for g in grads64)
        for name, f, r, r64 in zip(NAMES, both(kernels, args, grads), both(op, args, grads), ref64):
            assert f.dtype == dtype, name
            assert_by_rule(f, r, r64, f"{name} {dtype}")


def test_zero_stiffness_denominator_gives_zero_and_zero_gradients():
    y0, y1, k, g_prev, h = inputs(7, 4, 9)
    g_prev[1] = y1[1]  # sample 1: y1 - g_prev = 0
    args = (y0, y1, k, g_prev, h, list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    grads = (torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64))
    got, want = both(kernels, args, grads), both(op, args, grads)
    assert got[1][1] == 0 and torch.isfinite(torch.cat([g.flatten() for g in got])).all()
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_a_nan_stage_input_gives_nan_stiffness_and_gradients():
    y0, y1, k, g_prev, h = inputs(7, 4, 9)
    g_prev[2, 3] = float("nan")  # sample 2 only
    args = (y0, y1, k, g_prev, h, list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    grads = (torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64))
    got, want = both(kernels, args, grads), both(op, args, grads)
    assert got[1][2].isnan() and torch.isfinite(got[1][[0, 1, 3]]).all()
    assert got[2 + 1][2].isnan().all() and torch.isfinite(got[2 + 1][[0, 1, 3]]).all()  # dL/dy1
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stiffness_of_a_linear_field_is_the_eigenvalue_modulus(dtype):
    # f(y) = lambda y: k[s-1] - k[s-2] = lambda (y1 - g_prev), so rho = |lambda|, per sample
    lam = torch.tensor([-3.0, 0.5, -250.0, 7.25], dtype=dtype)
    y0, y1, _, g_prev, h = inputs(7, 4, 13, dtype)
    k = torch.randn(7, 4, 13, dtype=dtype)
    k[6], k[5] = lam[:, None] * y1, lam[:, None] * g_prev
    _, rho = kernels.forward(y0, y1, k, g_prev, h, list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    torch.testing.assert_close(rho, lam.abs())


def test_non_contiguous_inputs_and_longer_rows():
    args = inputs(7, 3, 300)  # D > the largest D block: both loops run over pieces of the row
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in args]
    constants = (list(ode.DOPRI5.b_err), 1e-3, 1e-6)
    grads = (torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    for name, g, w in zip(NAMES, both(kernels, (*strided, *constants), grads), both(op, (*args, *constants), grads)):
        torch.testing.assert_close(g, w, msg=name)


def test_every_output_element_is_written(poisoned_outputs):
    args = (*inputs(7, 35, 150, torch.float32), list(ode.DOPRI5.b_err), 1e-3, 1e-6)  # partial tiles on both axes
    grads = (torch.rand(35), torch.rand(35))
    assert all(torch.isfinite(t).all() for t in both(kernels, args, grads))
