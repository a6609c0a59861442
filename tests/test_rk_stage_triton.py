"""The Triton path of rk_stage (kernels/rk_stage.py), run on CPU tensors under TRITON_INTERPRET=1, judged by the
numerics rule against accel.reference.ode's stage input g = y0 + h sum_j a_j k_j (ode.combination) and its autograd
gradients, run in float64 and in the kernels' dtype on the same rounded inputs."""
import pytest
import torch

from accel.reference import ode
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("rk_stage")

# rows of the DOPRI5 tableau: one coefficient, three, six with a zero; a row with zeros only; an empty row
ROWS = [list(ode.DOPRI5.a[1]), list(ode.DOPRI5.a[3]), list(ode.DOPRI5.a[6]), [0.0, 0.0, 0.0], []]
NAMES = ["g", "grad k", "grad h"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(s, B, D, dtype=torch.float64):
    """y0, k, h and the gradient of g, drawn in float64 and rounded to dtype."""
    drawn = (torch.randn(B, D, dtype=torch.float64), torch.randn(s, B, D, dtype=torch.float64),
             torch.rand(B, dtype=torch.float64) * 0.1 + 0.01, torch.randn(B, D, dtype=torch.float64))
    return tuple(t.to(dtype) for t in drawn)


def reference(y0, k, h, grad, a):
    """[g, grad k, grad h] of the reference in the inputs' dtype."""
    k, h = k.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    g = y0 + h[:, None] * ode.combination(k, a)
    return [g.detach(), *torch.autograd.grad(g, [k, h], grad, allow_unused=True, materialize_grads=True)]


def run_and_judge(y0, k, h, grad, a):
    fast = [kernels.forward(y0, k, h, a), *kernels.backward(grad, k, h, a)]
    in_dtype = reference(y0, k, h, grad, a)
    ref64 = reference(y0.double(), k.double(), h.double(), grad.double(), a)
    for name, f, r, r64 in zip(NAMES, fast, in_dtype, ref64, strict=True):
        assert f.dtype == y0.dtype, name
        assert_by_rule(f, r, r64, f"{name} {y0.dtype} a={a}")
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 40])
@pytest.mark.parametrize("row", range(len(ROWS)))
def test_forward_and_backward_follow_the_numerics_rule(B, D, row, dtype):
    run_and_judge(*inputs(7, B, D, dtype), ROWS[row])


def test_zero_coefficient_stages_are_not_read_and_get_exact_zero_gradients():
    a = list(ode.DOPRI5.a[6])  # a[1] = 0
    y0, k, h, grad = inputs(7, 7, 5)
    k[1] = float("nan")  # unused stages: a zero coefficient and beyond len(a)
    k[6] = float("nan")
    g, grad_k, grad_h = run_and_judge(y0, k, h, grad, a)
    assert torch.isfinite(g).all() and torch.isfinite(grad_h).all()
    assert (grad_k[1] == 0).all() and (grad_k[6] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs_and_longer_rows(dtype):
    # D > the largest D block: the backward loops over pieces of the row
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in inputs(7, 3, 600, dtype)]
    run_and_judge(*strided, list(ode.DOPRI5.a[5]))


def test_every_output_element_is_written(poisoned_outputs):
    y0, k, h, grad = inputs(7, 35, 300, torch.float32)  # partial tiles on both axes
    for a in (list(ode.DOPRI5.a[4]), []):
        assert all(torch.isfinite(t).all() for t in run_and_judge(y0, k, h, grad, a))


def test_empty_batch():
    y0, k, h, grad = inputs(7, 0, 5)
    assert kernels.forward(y0, k, h, [0.2]).shape == (0, 5)
    grad_k, grad_h = kernels.backward(grad, k, h, [0.2])
    assert grad_k.shape == (7, 0, 5) and grad_h.shape == (0,)
