"""The Triton path of rk_stage (kernels/rk_stage.py), run on CPU tensors under TRITON_INTERPRET=1, against the
op's reference kernels (accel/ops/rk_stage.py) by the numerics rule."""
import importlib

import pytest
import torch

from accel.reference import ode
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("rk_stage")
op = importlib.import_module("accel.ops.rk_stage")  # the module: accel.ops.rk_stage is also the function

# rows of the DOPRI5 tableau: one coefficient, three, six with a zero; a row with zeros only; an empty row
ROWS = [list(ode.DOPRI5.a[1]), list(ode.DOPRI5.a[3]), list(ode.DOPRI5.a[6]), [0.0, 0.0, 0.0], []]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(s, B, D, dtype=torch.float64):
    return (torch.randn(B, D, dtype=dtype), torch.randn(s, B, D, dtype=dtype), torch.rand(B, dtype=dtype) * 0.1 + 0.01,
            torch.randn(B, D, dtype=dtype))


@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 40])
@pytest.mark.parametrize("row", range(len(ROWS)))
def test_forward_and_backward_match_the_reference_by_the_numerics_rule(B, D, row):
    a = ROWS[row]
    y0, k, h, grad = inputs(7, B, D)
    ref64 = [op._reference_forward(y0, k, h, a), *op._reference_backward(grad, k, h, a)]
    for dtype in (torch.float32, torch.float64):
        y0d, kd, hd, gradd = (t.to(dtype) for t in (y0, k, h, grad))
        fast = [kernels.forward(y0d, kd, hd, a), *kernels.backward(gradd, kd, hd, a)]
        ref = [op._reference_forward(y0d, kd, hd, a), *op._reference_backward(gradd, kd, hd, a)]
        for name, f, r, r64 in zip(["g", "grad k", "grad h"], fast, ref, ref64):
            assert f.dtype == dtype, name
            assert_by_rule(f, r, r64, f"{name} {dtype} a={a}")


def test_zero_coefficient_stages_are_not_read_and_get_exact_zero_gradients():
    a = list(ode.DOPRI5.a[6])  # a[1] = 0
    y0, k, h, grad = inputs(7, 7, 5)
    k[1] = float("nan")  # unused stage: a zero coefficient and beyond len(a)
    k[6] = float("nan")
    g = kernels.forward(y0, k, h, a)
    grad_k, grad_h = kernels.backward(grad, k, h, a)
    assert torch.isfinite(g).all() and torch.isfinite(grad_h).all()
    assert (grad_k[1] == 0).all() and (grad_k[6] == 0).all()
    torch.testing.assert_close(g, op._reference_forward(y0, k, h, a))


def test_non_contiguous_inputs_and_longer_rows():
    a = list(ode.DOPRI5.a[5])
    y0, k, h, grad = inputs(7, 3, 600)  # D > the largest D block: the backward loops over pieces of the row
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (y0, k, h, grad)]
    y0s, ks, hs, grads = strided
    torch.testing.assert_close(kernels.forward(y0s, ks, hs, a), op._reference_forward(y0, k, h, a))
    for got, want in zip(kernels.backward(grads, ks, hs, a), op._reference_backward(grad, k, h, a)):
        torch.testing.assert_close(got, want)


def test_every_output_element_is_written(poisoned_outputs):
    y0, k, h, grad = inputs(7, 35, 300, torch.float32)  # partial tiles on both axes
    for a in (list(ode.DOPRI5.a[4]), []):
        g = kernels.forward(y0, k, h, a)
        grad_k, grad_h = kernels.backward(grad, k, h, a)
        assert all(torch.isfinite(t).all() for t in (g, grad_k, grad_h))


def test_empty_batch():
    y0, k, h, grad = inputs(7, 0, 5)
    assert kernels.forward(y0, k, h, [0.2]).shape == (0, 5)
    grad_k, grad_h = kernels.backward(grad, k, h, [0.2])
    assert grad_k.shape == (7, 0, 5) and grad_h.shape == (0,)
