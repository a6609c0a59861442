"""accel.ops.rk_stage against the stage input of accel.reference.ode.rk_step, g = y + h sum_j a_j k_j."""
import importlib

import pytest
import torch

from accel.ops import rk_stage
from accel.reference import ode
from conftest import assert_by_rule

DOPRI5 = ode.DOPRI5


def reference(y0, k, h, a):
    """rk_step's g_i = y + h sum_j a_ij k_j, in plain torch (zero coefficients included)."""
    return y0 + h[:, None] * sum(aj * k[j] for j, aj in enumerate(a)) if len(a) else y0.clone()


def run(fn, args, grad):
    """The output and the gradients w.r.t. y0, k, h."""
    y0, k, h, a = (t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    g = fn(y0, k, h, a)
    return [g, *torch.autograd.grad(g, [y0, k, h], grad, allow_unused=True, materialize_grads=True)]


def inputs(s, B, D, dtype=torch.float64):
    return (torch.randn(B, D, dtype=dtype), torch.randn(s, B, D, dtype=dtype), torch.rand(B, dtype=dtype) * 0.2)


# rows of DOPRI5 (one with a zero coefficient, one as long as the buffer) and a longer-than-8 row
ROWS = [DOPRI5.a[1], DOPRI5.a[3], DOPRI5.a[6], (0.3, -1.2, 0.7, 0.0, 2.0, -0.4, 1.1, 0.9, -0.6, 0.25)]


@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 33])
@pytest.mark.parametrize("row", range(len(ROWS)))
def test_matches_the_reference_by_the_numerics_rule(B, D, row):
    a = list(ROWS[row])
    s = max(7, len(a))
    y0, k, h = inputs(s, B, D)
    grad = torch.randn(B, D, dtype=torch.float64)
    ref64 = run(reference, (y0, k, h, a), grad)
    for dtype in (torch.float32, torch.float64):
        args = (y0.to(dtype), k.to(dtype), h.to(dtype), a)
        fast = run(rk_stage, args, grad.to(dtype))
        ref = run(reference, args, grad.to(dtype))
        for name, f, r, r64 in zip(["g", "grad y0", "grad k", "grad h"], fast, ref, ref64):
            assert f.dtype == dtype
            assert_by_rule(f, r, r64, f"{name} {dtype}")


def test_long_rows_and_parallel_tiles():
    # D > 512: rows in pieces; B * D * stages large enough for the parallel loop
    for s, B, D in ((7, 3, 1100), (7, 2048, 33)):
        y0, k, h = inputs(s, B, D)
        a = list(DOPRI5.a[5])
        grad = torch.randn(B, D, dtype=torch.float64)
        got, want = run(rk_stage, (y0, k, h, a), grad), run(reference, (y0, k, h, a), grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_non_contiguous_inputs():
    y0, k, h = inputs(7, 9, 6)
    a = list(DOPRI5.a[4])
    y0_t = y0.t().contiguous().t()  # column-major
    k_nc = torch.stack([k, k], dim=-1)[..., 0]  # strided last axis
    h_nc = torch.stack([h, h], dim=-1)[:, 0]
    assert not (y0_t.is_contiguous() or k_nc.is_contiguous() or h_nc.is_contiguous())
    grad = torch.randn(9, 6, dtype=torch.float64).t().contiguous().t()
    got = run(rk_stage, (y0_t, k_nc, h_nc, a), grad)
    want = run(reference, (y0, k, h, a), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("s, B, D, a", [
    (7, 7, 5, list(DOPRI5.a[6])), (7, 3, 1100, list(DOPRI5.a[2])), (10, 5, 33, list(ROWS[3])), (7, 4, 3, []),
    (7, 4, 3, [0.0, 0.0]), (7, 2048, 33, list(DOPRI5.a[5])), (7, 0, 3, [0.5]), (7, 3, 0, [0.5]),
])
def test_every_output_element_is_written(poisoned_outputs, s, B, D, a):
    y0, k, h = (t.float() for t in inputs(s, B, D))
    g = rk_stage(y0, k, h, a)
    assert g.shape == (B, D) and torch.isfinite(g).all()
    torch.testing.assert_close(g, reference(y0, k, h, a))
    grad = torch.randn(B, D)
    grad_k, grad_h = torch.ops.accel.rk_stage_backward(grad, k, h, a)
    assert grad_k.shape == (s, B, D) and grad_h.shape == (B,)
    assert torch.isfinite(grad_k).all() and torch.isfinite(grad_h).all()
    if len(a) < s:
        assert (grad_k[len(a):] == 0).all()


def test_empty_row_is_a_copy_and_zero_coefficients_are_skipped():
    y0, k, h = inputs(7, 4, 3)
    g = rk_stage(y0, k, h, [])
    assert torch.equal(g, y0) and g.data_ptr() != y0.data_ptr()
    k[1] = float("nan")  # a stage whose coefficient is 0 is never read
    torch.testing.assert_close(rk_stage(y0, k, h, (0.5, 0.0, 0.25)), y0 + h[:, None] * (0.5 * k[0] + 0.25 * k[2]))


def test_gradcheck_float64():
    y0, k, h = (t.requires_grad_() for t in inputs(5, 3, 4))
    for a in ([0.3, 0.0, -1.5], list(DOPRI5.a[4]), [], [1.0, 2.0, 3.0, 4.0, 5.0]):
        assert torch.autograd.gradcheck(lambda y0, k, h: rk_stage(y0, k, h, a), (y0, k, h))
    # only one of the inputs needs a gradient
    assert torch.autograd.gradcheck(lambda h: rk_stage(y0.detach(), k.detach(), h, [0.5, 0.5]), (h,))


def test_opcheck_compile_and_reference_backends():
    y0, k, h = (t.requires_grad_() for t in inputs(7, 5, 3))
    for a in (list(DOPRI5.a[3]), [], [0.0, 1.0]):
        torch.library.opcheck(torch.ops.accel.rk_stage.default, (y0, k, h, a))
    grad = torch.randn(5, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.accel.rk_stage_backward.default, (grad, k.detach(), h.detach(), list(DOPRI5.a[3])))
    a = list(DOPRI5.a[5])
    compiled = torch.compile(lambda y0, k, h: rk_stage(y0, k, h, a).square().sum(), fullgraph=True,
                             backend="aot_eager")
    got = torch.autograd.grad(compiled(y0, k, h), [y0, k, h])
    want = torch.autograd.grad(reference(y0, k, h, a).square().sum(), [y0, k, h])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the fallback used when the extension is not built
    module = importlib.import_module("accel.ops.rk_stage")
    args = (y0.detach(), k.detach(), h.detach(), a)
    torch.testing.assert_close(module._reference_forward(*args), torch.ops.accel.rk_stage(*args))
    for g, w in zip(module._reference_backward(grad, *args[1:]), torch.ops.accel.rk_stage_backward(grad, *args[1:])):
        torch.testing.assert_close(g, w)


def test_fast_paths_match_the_registered_autograd():
    y0, k, h = (t.requires_grad_() for t in inputs(7, 5, 3))
    a = list(DOPRI5.a[4])
    with torch.no_grad():
        g = rk_stage(y0, k, h, a)  # straight to the kernel
    assert not g.requires_grad
    assert rk_stage(y0.detach(), k.detach(), h.detach(), a).grad_fn is None
    grad = torch.randn(5, 3, dtype=torch.float64)
    eager = run(rk_stage, (y0, k, h, a), grad)  # the eager autograd.Function
    registered = run(torch.ops.accel.rk_stage, (y0, k, h, a), grad)  # the op's registered autograd
    for e, r in zip(eager, registered):
        assert torch.equal(e, r)
    assert torch.equal(g, eager[0])


def test_dopri5_stages_reproduce_rk_step():
    torch.manual_seed(1)
    B, D = 6, 5
    W = torch.randn(D, D, dtype=torch.float64) / D ** 0.5

    def f(t, y):
        return torch.tanh(y @ W.to(y.dtype)) - 0.5 * y + torch.sin(t)[:, None]

    t = torch.rand(B, dtype=torch.float64)
    y = torch.randn(B, D, dtype=torch.float64)
    h = torch.rand(B, dtype=torch.float64) * 0.3 + 0.05
    ref64 = ode.rk_step(f, t, y, h, DOPRI5)[0]
    for dtype in (torch.float32, torch.float64):
        ty, yy, hy = t.to(dtype), y.to(dtype), h.to(dtype)
        k = yy.new_empty(7, B, D)
        k[0] = f(ty, yy)
        for i in range(1, 7):
            g = rk_stage(yy, k, hy, list(DOPRI5.a[i]))
            k[i] = f(ty + DOPRI5.c[i] * hy, g)
        # FSAL: the last stage's input is y1
        assert_by_rule(g, ode.rk_step(f, ty, yy, hy, DOPRI5)[0], ref64, f"y1 {dtype}")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda y0, k, h: rk_stage(y0[0], k, h, [1.0]), ValueError, r"`y0` must have shape \(B, D\)"),
        (lambda y0, k, h: rk_stage(y0, k[:, :3], h, [1.0]), ValueError, r"`k` must have shape \(s, B, D\)"),
        (lambda y0, k, h: rk_stage(y0, k[0], h, [1.0]), ValueError, r"`k` must have shape \(s, B, D\)"),
        (lambda y0, k, h: rk_stage(y0, k, h[:2], [1.0]), ValueError, r"`h` must have shape \(B,\)"),
        (lambda y0, k, h: rk_stage(y0, k, h[:, None], [1.0]), ValueError, r"`h` must have shape \(B,\)"),
        (lambda y0, k, h: rk_stage(y0, k.double(), h, [1.0]), TypeError, "must all be float32 or all float64"),
        (lambda y0, k, h: rk_stage(y0.int(), k.int(), h.int(), [1.0]), TypeError, "float32 or all float64"),
        (lambda y0, k, h: rk_stage(y0, k.to("meta"), h, [1.0]), ValueError, "must be on `y0`'s device"),
        (lambda y0, k, h: rk_stage(y0, k, h, [1.0] * 8), ValueError, "`a` has 8 coefficients but `k` only 7"),
        (lambda y0, k, h: rk_stage(y0, k, h, 1.0), TypeError, "`a` must be a list of floats"),
        (lambda y0, k, h: rk_stage(y0.numpy(), k, h, [1.0]), TypeError, "`y0` must be a Tensor"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 3), torch.randn(7, 4, 3), torch.rand(4))
