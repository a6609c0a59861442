"""accel.ops.rk_finalize against accel.reference.ode.error_norm and .stiffness."""
import importlib
import math

import pytest
import torch

from accel.ops import rk_finalize, rk_stage
from accel.reference import ode
from conftest import assert_by_rule

DOPRI5 = ode.DOPRI5
B_ERR = list(DOPRI5.b_err)


def reference(y0, y1, k, g_prev, h, b_err, rtol, atol):
    """error_norm and stiffness of accel.reference.ode, with err = h sum_i b_err[i] k[i] as in rk_step."""
    err = h[:, None] * sum(bi * k[i] for i, bi in enumerate(b_err))
    norm = ode.error_norm(err, y0, y1, rtol, atol)
    if not any(b_err):  # err = 0, norm = 0: the op's gradient is 0 there, the reference's sqrt's is NaN
        norm = norm.detach() + 0 * err.sum(-1)
    return norm, ode.stiffness(k, torch.stack([g_prev, y1]))


def run(fn, args, grads):
    """Both outputs and the gradients of <grads, outputs> w.r.t. y0, y1, k, g_prev, h."""
    leaves = [t.detach().clone().requires_grad_() for t in args[:5]]
    out = fn(*leaves, *args[5:])
    return [*out, *torch.autograd.grad(out, leaves, grads, allow_unused=True, materialize_grads=True)]


def inputs(s, B, D, dtype=torch.float64):
    y0 = torch.randn(B, D, dtype=dtype)
    y1 = y0 + 0.1 * torch.randn(B, D, dtype=dtype)
    k = torch.randn(s, B, D, dtype=dtype)
    g_prev = y0 + 0.1 * torch.randn(B, D, dtype=dtype)
    h = torch.rand(B, dtype=dtype) * 0.1 + 0.01
    return y0, y1, k, g_prev, h


NAMES = ["error_norm", "stiffness", "grad y0", "grad y1", "grad k", "grad g_prev", "grad h"]
# (b_err, rtol, atol): DOPRI5's (one zero weight), Tsit5's, more than 8 nonzero weights, all zero
WEIGHTS = [(B_ERR, 1e-3, 1e-6), (list(ode.TSIT5.b_err), 1e-6, 1e-8),
           ([0.1, -0.2, 0.05, 0.3, -0.1, 0.2, -0.3, 0.15, 0.1, -0.05], 1e-2, 0.0), ([0.0] * 7, 0.0, 1e-4)]


@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 33])
@pytest.mark.parametrize("weights", range(len(WEIGHTS)))
def test_matches_the_reference_by_the_numerics_rule(B, D, weights):
    b_err, rtol, atol = WEIGHTS[weights]
    args64 = (*inputs(len(b_err), B, D), b_err, rtol, atol)
    grads64 = (torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64))
    ref64 = run(reference, args64, grads64)
    for dtype in (torch.float32, torch.float64):
        args = (*(t.to(dtype) for t in args64[:5]), *args64[5:])
        grads = tuple(g.to(dtype) for g in grads64)
        fast = run(rk_finalize, args, grads)
        ref = run(reference, args, grads)
        for name, f, r, r64 in zip(NAMES, fast, ref, ref64):
            assert f.dtype == dtype
            assert_by_rule(f, r, r64, f"{name} {dtype}")


def test_long_rows_and_parallel_tiles():
    # D > 512: rows in pieces, summed on one thread; B * D large enough for the parallel loop
    for s, B, D in ((7, 3, 1100), (7, 2048, 33), (10, 2, 700)):
        b_err = B_ERR if s == 7 else WEIGHTS[2][0]
        args = (*inputs(s, B, D), b_err, 1e-3, 1e-6)
        grads = (torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64))
        for name, g, w in zip(NAMES, run(rk_finalize, args, grads), run(reference, args, grads)):
            torch.testing.assert_close(g, w, msg=name)


def test_non_contiguous_inputs():
    y0, y1, k, g_prev, h = inputs(7, 9, 6)
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (y0, y1, k, g_prev, h)]
    assert not any(t.is_contiguous() for t in strided)
    grads = (torch.rand(9, dtype=torch.float64), torch.rand(9, dtype=torch.float64))
    got = run(rk_finalize, (*strided, B_ERR, 1e-3, 1e-6), grads)
    want = run(reference, (y0, y1, k, g_prev, h, B_ERR, 1e-3, 1e-6), grads)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("s, B, D, b_err", [
    (7, 7, 5, B_ERR), (7, 3, 1100, B_ERR), (10, 5, 33, WEIGHTS[2][0]), (7, 4, 3, [0.0] * 7),
    (7, 2048, 33, B_ERR), (7, 0, 3, B_ERR), (2, 3, 1, [0.5, -0.5]),
])
def test_every_output_element_is_written(poisoned_outputs, s, B, D, b_err):
    y0, y1, k, g_prev, h = (t.float() for t in inputs(s, B, D))
    norm, rho = rk_finalize(y0, y1, k, g_prev, h, b_err, 1e-3, 1e-6)
    assert norm.shape == rho.shape == (B,)
    assert torch.isfinite(norm).all() and torch.isfinite(rho).all()
    want = reference(y0, y1, k, g_prev, h, b_err, 1e-3, 1e-6)
    torch.testing.assert_close((norm, rho), want)
    grads = torch.ops.accel.rk_finalize_backward(torch.rand(B), torch.rand(B), y0, y1, k, g_prev, h, b_err, 1e-3, 1e-6)
    for g, t in zip(grads, (y0, y1, k, g_prev, h)):
        assert g.shape == t.shape and torch.isfinite(g).all()


def test_zero_norm_and_zero_denominator_give_zero_gradients():
    y0, y1, k, g_prev, h = inputs(7, 4, 5)
    h[0] = 0.0  # a finished sample: err = 0, norm = 0
    g_prev[1] = y1[1]  # the stiffness denominator is 0
    k[6, 2] = k[5, 2]  # the stiffness numerator is 0
    leaves = [t.requires_grad_() for t in (y0, y1, k, g_prev, h)]

    def gradients(which):
        outputs = rk_finalize(*leaves, B_ERR, 1e-3, 1e-6)
        return outputs, torch.autograd.grad(sum(outputs[i].sum() for i in which), leaves)

    (norm, rho), both = gradients([0, 1])
    assert norm[0] == 0 and rho[1] == 0 and rho[2] == 0 and norm[1:].gt(0).all() and rho[[0, 3]].gt(0).all()
    assert all(torch.isfinite(g).all() for g in both)
    # sample 0 gets its gradients from rho only, samples 1 and 2 from the norm only
    _, only_norm = gradients([0])
    _, only_rho = gradients([1])
    for g, gn, gr in zip(both, only_norm, only_rho):
        b = 1 if g.dim() == 3 else 0  # the batch axis
        torch.testing.assert_close(g.select(b, 0), gr.select(b, 0))
        torch.testing.assert_close(g.narrow(b, 1, 2), gn.narrow(b, 1, 2))
    # and those gradients are the reference's where it has them
    ref_rho = torch.autograd.grad(reference(*leaves, B_ERR, 1e-3, 1e-6)[1].sum(), leaves, allow_unused=True,
                                  materialize_grads=True)
    for g, w in zip(only_rho, ref_rho):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_stage_input_gives_nan_stiffness_and_gradients(dtype):
    y0, y1, k, g_prev, h = (t.to(dtype) for t in inputs(7, 4, 5))
    g_prev[2, 3] = float("nan")  # sample 2 only: its stiffness and the gradients through it are NaN, not 0
    args = (y0, y1, k, g_prev, h, B_ERR, 1e-3, 1e-6)
    grads = (torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype))
    fast, ref = run(rk_finalize, args, grads), run(reference, args, grads)
    assert fast[1][2].isnan() and torch.isfinite(fast[1][[0, 1, 3]]).all()
    assert fast[3][2].isnan().all() and torch.isfinite(fast[3][[0, 1, 3]]).all()  # dL/dy1
    for name, f, r in zip(NAMES, fast, ref):
        torch.testing.assert_close(f, r, msg=name, equal_nan=True)


def test_fast_paths_match_the_registered_autograd():
    args = (*inputs(7, 5, 3), B_ERR, 1e-3, 1e-6)
    with torch.no_grad():
        plain = rk_finalize(*(t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args))
    assert not any(t.requires_grad for t in plain)
    grads = (torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64))
    eager = run(rk_finalize, args, grads)  # the eager autograd.Function
    registered = run(torch.ops.accel.rk_finalize, args, grads)  # the op's registered autograd
    for e, r in zip(eager, registered):
        assert torch.equal(e, r)
    assert torch.equal(plain[0], eager[0]) and torch.equal(plain[1], eager[1])


def test_gradcheck_float64():
    leaves = [t.requires_grad_() for t in inputs(7, 3, 4)]
    assert torch.autograd.gradcheck(lambda *t: rk_finalize(*t, B_ERR, 1e-3, 1e-6), leaves)
    assert torch.autograd.gradcheck(lambda *t: rk_finalize(*t, WEIGHTS[2][0], 1e-2, 1e-3),
                                    [t.detach().repeat(2, 1, 1)[:10].requires_grad_() if t.dim() == 3 else t
                                     for t in leaves])
    # one output at a time, and only some inputs
    assert torch.autograd.gradcheck(lambda k, h: rk_finalize(leaves[0], leaves[1], k, leaves[3], h, B_ERR, 1e-3,
                                                             1e-6)[0], (leaves[2], leaves[4]))
    assert torch.autograd.gradcheck(lambda y1, gp: rk_finalize(leaves[0], y1, leaves[2], gp, leaves[4], B_ERR, 1e-3,
                                                               1e-6)[1], (leaves[1], leaves[3]))


def test_opcheck_compile_and_reference_backends():
    args = [t.requires_grad_() for t in inputs(7, 5, 3)]
    torch.library.opcheck(torch.ops.accel.rk_finalize.default, (*args, B_ERR, 1e-3, 1e-6))
    torch.library.opcheck(torch.ops.accel.rk_finalize.default, (*args, [0.0] * 7, 0.0, 1e-4))
    grads = (torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64))
    detached = [t.detach() for t in args]
    torch.library.opcheck(torch.ops.accel.rk_finalize_backward.default, (*grads, *detached, B_ERR, 1e-3, 1e-6))
    compiled = torch.compile(lambda *t: sum(x.sum() for x in rk_finalize(*t, B_ERR, 1e-3, 1e-6)), fullgraph=True,
                             backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(sum(x.sum() for x in reference(*args, B_ERR, 1e-3, 1e-6)), args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the fallback used when the extension is not built
    module = importlib.import_module("accel.ops.rk_finalize")
    torch.testing.assert_close(module._reference_forward(*detached, B_ERR, 1e-3, 1e-6),
                               torch.ops.accel.rk_finalize(*detached, B_ERR, 1e-3, 1e-6))
    for g, w in zip(module._reference_backward(*grads, *detached, B_ERR, 1e-3, 1e-6),
                    torch.ops.accel.rk_finalize_backward(*grads, *detached, B_ERR, 1e-3, 1e-6)):
        torch.testing.assert_close(g, w)


def dopri5_step(f, t, y, h):
    """One DOPRI5 step through rk_stage: y1, the stages k and the input of stage s-2."""
    k = y.new_empty(7, *y.shape)
    k[0] = f(t, y)
    g_prev = g = y
    for i in range(1, 7):
        g_prev, g = g, rk_stage(y, k, h, list(DOPRI5.a[i]))
        k[i] = f(t + DOPRI5.c[i] * h, g)
    return g, k, g_prev  # FSAL: the last stage's input is y1


def test_dopri5_step_reproduces_error_norm_and_stiffness():
    torch.manual_seed(2)
    B, D = 6, 5
    W = torch.randn(D, D, dtype=torch.float64) / D ** 0.5

    def f(t, y):
        return torch.tanh(y @ W.to(y.dtype)) - 2.0 * y + torch.cos(t)[:, None]

    t = torch.rand(B, dtype=torch.float64)
    y = torch.randn(B, D, dtype=torch.float64)
    h = torch.rand(B, dtype=torch.float64) * 0.3 + 0.05
    rtol, atol = 1e-4, 1e-6

    def reference_step(t, y, h):
        y1, err, k, g = ode.rk_step(f, t, y, h, DOPRI5)
        return ode.error_norm(err, y, y1, rtol, atol), ode.stiffness(k, g)

    # float64: the whole step, rk_stage's stages and rk_finalize's estimates, against rk_step's
    y1, k, g_prev = dopri5_step(f, t, y, h)
    y1_ref, _, k_ref, g_ref = ode.rk_step(f, t, y, h, DOPRI5)
    torch.testing.assert_close(y1, y1_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k, k_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_prev, g_ref[-2], rtol=1e-12, atol=1e-14)
    for got, want in zip(rk_finalize(y, y1, k, g_prev, h, B_ERR, rtol, atol), reference_step(t, y, h)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    # float32, by the rule on the float32 step's stages: the stiffness divides the difference of two stages by
    # the difference of their inputs (h times the stages' size, next to |y|), so the float32 rounding of each
    # step's g and k is amplified alike in every implementation; the estimates are judged on one set of stages
    y1, k, g_prev = dopri5_step(f, t.float(), y.float(), h.float())
    args = (y.float(), y1, k, g_prev, h.float(), B_ERR, rtol, atol)
    fast = rk_finalize(*args)
    ref = reference(*args)
    ref64 = reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    for name, got, r, r64 in zip(NAMES, fast, ref, ref64):
        assert_by_rule(got, r, r64, f"{name} float32")


def test_stiffness_of_a_linear_problem_is_the_eigenvalue():
    lam = torch.tensor([-1.0, -30.0, -500.0, 2.5, -0.01], dtype=torch.float64)
    y = torch.randn(5, 7, dtype=torch.float64)
    h = torch.tensor([0.1, 0.05, 0.004, 0.2, 1.0], dtype=torch.float64)
    y1, k, g_prev = dopri5_step(lambda t, y: lam[:, None] * y, torch.zeros(5, dtype=torch.float64), y, h)
    _, rho = rk_finalize(y, y1, k, g_prev, h, B_ERR, 1e-6, 1e-8)
    torch.testing.assert_close(rho, lam.abs(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda a: rk_finalize(a[0][0], *a[1:]), ValueError, r"`y0` must have shape \(B, D\)"),
        (lambda a: rk_finalize(a[0], a[1][:2], *a[2:]), ValueError, "`y1` must have `y0`'s shape"),
        (lambda a: rk_finalize(*a[:3], a[3][:, :2], *a[4:]), ValueError, "`g_prev` must have `y0`'s shape"),
        (lambda a: rk_finalize(*a[:2], a[2][:, :2], *a[3:]), ValueError, r"`k` must have shape \(s, B, D\)"),
        (lambda a: rk_finalize(*a[:2], a[2][:1], *a[3:5], [0.1], *a[6:]), ValueError, r"s >= 2"),
        (lambda a: rk_finalize(*a[:4], a[4][:3], *a[5:]), ValueError, r"`h` must have shape \(B,\)"),
        (lambda a: rk_finalize(a[0], a[1].double(), *a[2:]), TypeError, "must all be float32 or all float64"),
        (lambda a: rk_finalize(*(t.half() for t in a[:5]), *a[5:]), TypeError, "float32 or all float64"),
        (lambda a: rk_finalize(*a[:3], a[3].to("meta"), *a[4:]), ValueError, "must be on `y0`'s device"),
        (lambda a: rk_finalize(*a[:5], a[5][:6], *a[6:]), ValueError, "`b_err` must be a list of 7 floats"),
        (lambda a: rk_finalize(*a[:6], -1e-3, 1e-6), ValueError, "`rtol` must be a finite number >= 0"),
        (lambda a: rk_finalize(*a[:6], 1e-3, math.nan), ValueError, "`atol` must be a finite number >= 0"),
        (lambda a: rk_finalize(*a[:6], math.inf, 1e-6), ValueError, "`rtol` must be a finite number >= 0"),
        (lambda a: rk_finalize(*a[:6], 0.0, 0.0), ValueError, "cannot both be 0"),
        (lambda a: rk_finalize(*a[:6], torch.tensor(1e-3), 1e-6), ValueError, "Python floats"),
        (lambda a: rk_finalize(*a[:6], "1e-3", 1e-6), ValueError, "Python floats"),
        (lambda a: rk_finalize(a[0].tolist(), *a[1:]), TypeError, "`y0` must be a Tensor"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    args = [*(t.float() for t in inputs(7, 4, 3)), B_ERR, 1e-3, 1e-6]
    with pytest.raises(error, match=match):
        call(args)
