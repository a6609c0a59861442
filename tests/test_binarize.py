"""accel.ops.binarize: sign() forward, and each estimator's backward against its definition: the STE, the clipped
STE, and ReSTE's derivative of f_o(x) = sign(x) |x|^(1/o), taken by autograd on f_o itself; the o schedule;
opcheck and compile."""
import math

import pytest
import torch

from accel.ops import binarize
from accel.reference.binary import reste_power


def grad_of(x, **kw):
    x = x.clone().requires_grad_()
    g = torch.randn_like(x)
    binarize(x, **kw).backward(g)
    return x.grad, g


def test_forward_is_sign_with_zero_to_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    torch.testing.assert_close(binarize(x, "ste"), torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]), rtol=0, atol=0)


def test_ste_and_clipped_ste():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    grad, g = grad_of(x, estimator="ste")
    torch.testing.assert_close(grad, g)
    grad, g = grad_of(x, estimator="clipped")
    torch.testing.assert_close(grad, torch.where(x.abs() <= 1, g, 0.0))


@pytest.mark.parametrize("o", [1.0, 1.7, 3.0])
def test_reste_is_the_derivative_of_the_power_function(o):
    t, delta = 1.5, 0.1
    x = torch.cat([torch.linspace(-2, 2, 401, dtype=torch.float64), torch.tensor([0.0, delta, -delta, t, -t])])
    grad, g = grad_of(x, estimator="reste", o=o, t=t, delta=delta)
    # where delta < |x| <= t: d/dx sign(x) |x|^(1/o), by autograd on the function itself
    xs = x.clone().requires_grad_()
    (torch.sign(xs) * xs.abs() ** (1 / o)).sum().backward()
    inside = (x.abs() > delta) & (x.abs() <= t)
    torch.testing.assert_close(grad[inside], (g * xs.grad)[inside])
    # within delta of 0: the slope of the secant of f_o over [0, delta]
    near = x.abs() <= delta
    torch.testing.assert_close(grad[near], g[near] * (delta ** (1 / o)) / delta)
    # beyond t: nothing
    assert (grad[x.abs() > t] == 0).all()


def test_reste_with_o_one_is_the_clipped_ste_at_t():
    x = torch.linspace(-2, 2, 81, dtype=torch.float64)
    grad, g = grad_of(x, estimator="reste", o=1.0, t=1.5)
    torch.testing.assert_close(grad, torch.where(x.abs() <= 1.5, g, 0.0))


def test_power_schedule_is_a_cosine_ramp_from_one_to_o_end():
    assert reste_power(0.0) == 1.0
    assert math.isclose(reste_power(1.0), 3.0)
    assert math.isclose(reste_power(0.5), 2.0)
    values = [reste_power(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_opcheck_and_compile():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.accel.binarize.default, (x, "reste", 2.0, 1.5, 0.1))
    compiled = torch.compile(lambda x: binarize(x, "reste", o=2.0) * x, fullgraph=True)
    out = compiled(x)
    grad, = torch.autograd.grad(out.sum(), x)
    expected_out = binarize(x, "reste", o=2.0) * x
    expected_grad, = torch.autograd.grad(expected_out.sum(), x)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("kw, match", [({"estimator": "tanh"}, "`estimator`"), ({"o": 0.5}, "`o`"),
                                       ({"t": float("nan")}, "`t`"), ({"delta": 2.0}, "`delta`")])
def test_bad_input_raises_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        binarize(torch.randn(3), **kw)
