"""accel.ops.krylov_kernel against the definition (L mat-vecs in float64), the reference's repeated squaring and
an independent discretisation by scipy."""
import importlib

import numpy as np
import pytest
import torch

from accel.ops import krylov_kernel
from accel.reference import lssl as reference
from conftest import assert_by_rule


def system(H, N, M, dtype=torch.float64, measure="legs"):
    """A stable discrete system per feature: HiPPO A, bilinear steps dt in [1e-3, 1e-1], random C."""
    A, B = reference.hippo(measure, N)
    dt = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(np.log(1e-3), np.log(1e-1)))
    dA, dB = reference.discretize(A, B, dt)
    C = torch.randn(H, M, N, dtype=torch.float64)
    return dA.to(dtype), dB.to(dtype), C.to(dtype)


def run(fn, dA, dB, C, L, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (dA, dB, C)]
    K = fn(*inputs, L)
    return [K, *torch.autograd.grad(K, inputs, grad, allow_unused=True, materialize_grads=True)]


@pytest.mark.parametrize("H, N, M, L", [(3, 8, 1, 100), (2, 5, 3, 1), (1, 16, 2, 17), (4, 4, 1, 1000), (2, 7, 2, 64)])
def test_matches_the_definition_by_the_numerics_rule(H, N, M, L):
    dA, dB, C = system(H, N, M)
    grad = torch.randn(H, M, L, dtype=torch.float64)
    fast = run(krylov_kernel, dA.float(), dB.float(), C.float(), L, grad.float())
    ref32 = run(reference.krylov_naive, dA.float(), dB.float(), C.float(), L, grad.float())
    ref64 = run(reference.krylov_naive, dA, dB, C, L, grad)
    for name, f, r32, r64 in zip(["K", "grad dA", "grad dB", "grad C"], fast, ref32, ref64):
        # The blocked kernel multiplies powers in another order than L mat-vecs: the errors of float32 are of
        # the same size but not the same, so the rule's factor 2 stands.
        assert_by_rule(f, r32, r64, name)


def test_matches_repeated_squaring_and_float64_gradcheck():
    dA, dB, C = system(2, 6, 2)
    torch.testing.assert_close(krylov_kernel(dA, dB, C, 50), reference.krylov_squaring(dA, dB, C, 50))
    inputs = [t.clone().requires_grad_() for t in system(2, 4, 2)]
    assert torch.autograd.gradcheck(lambda a, b, c: krylov_kernel(a, b, c, 23), inputs)


def test_against_scipy_bilinear_discretisation_and_numpy_powers():
    signal = pytest.importorskip("scipy.signal")
    N, L, dt = 6, 40, 0.05
    A, B = reference.hippo("legt", N)
    C = torch.randn(1, 1, N, dtype=torch.float64)
    # scipy's generalised bilinear transform has our dA and dB (its output matrices differ: it shifts the
    # output equation by half a step, which the LSSL does not).
    dA_s, dB_s, *_ = signal.cont2discrete((A.numpy(), B.numpy()[:, None], C[0].numpy(), np.zeros((1, 1))), dt,
                                          method="bilinear")
    dA, dB = reference.discretize(A, B, torch.tensor([dt], dtype=torch.float64))
    np.testing.assert_allclose(dA[0].numpy(), dA_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB[0].numpy(), dB_s[:, 0], rtol=1e-10, atol=1e-12)
    want = [C[0, 0].numpy() @ np.linalg.matrix_power(dA_s, l) @ dB_s[:, 0] for l in range(L)]
    torch.testing.assert_close(krylov_kernel(dA, dB, C, L)[0, 0], torch.tensor(want))


@pytest.mark.parametrize("measure", reference.MEASURES)
def test_every_hippo_measure_and_zoh(measure):
    A, B = reference.hippo(measure, 8)
    dt = torch.tensor([0.01, 0.05], dtype=torch.float64)
    for method in ("gbt", "zoh"):
        dA, dB = reference.discretize(A, B, dt, method)
        C = torch.randn(2, 1, 8, dtype=torch.float64)
        torch.testing.assert_close(krylov_kernel(dA, dB, C, 300), reference.krylov_naive(dA, dB, C, 300))
    # zero-order hold is exact for a constant input: the state after one step solves the ODE
    dA, dB = reference.discretize(A, B, dt[:1], "zoh")
    exact = torch.linalg.solve(A, (torch.linalg.matrix_exp(0.01 * A) - torch.eye(8, dtype=torch.float64)) @ B)
    torch.testing.assert_close(dB[0], exact)


def test_deterministic_and_every_element_written(poisoned_outputs):
    dA, dB, C = (t.float() for t in system(3, 8, 2))
    grad = torch.randn(3, 2, 77)
    first = run(krylov_kernel, dA, dB, C, 77, grad)
    second = run(krylov_kernel, dA, dB, C, 77, grad)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_opcheck_and_compile():
    dA, dB, C = (t.requires_grad_() for t in system(2, 4, 2))
    torch.library.opcheck(torch.ops.accel.krylov_kernel.default, (dA, dB, C, 9))
    torch.library.opcheck(torch.ops.accel.krylov_kernel_backward.default,
                          (torch.randn(2, 2, 9, dtype=torch.float64), dA.detach(), dB.detach(), C.detach(), 9))
    compiled = torch.compile(lambda a, b, c: krylov_kernel(a, b, c, 9).sum(), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(dA, dB, C), [dA, dB, C])
    want = torch.autograd.grad(reference.krylov_naive(dA, dB, C, 9).sum(), [dA, dB, C])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_fallback_matches_the_kernel():
    module = importlib.import_module("accel.ops.krylov_kernel")
    dA, dB, C = system(2, 5, 2)
    grad = torch.randn(2, 2, 30, dtype=torch.float64)
    torch.testing.assert_close(module._reference_forward(dA, dB, C, 30), krylov_kernel(dA, dB, C, 30))
    want = torch.ops.accel.krylov_kernel_backward(grad, dA, dB, C, 30)
    for g, w in zip(module._reference_backward(grad, dA, dB, C, 30), want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 1, 3), 5), "\\(H, N, N\\)"),
        ((torch.randn(2, 3, 3), torch.randn(2, 4), torch.randn(2, 1, 3), 5), "`dB`"),
        ((torch.randn(2, 3, 3), torch.randn(2, 3), torch.randn(3, 1, 3), 5), "`C`"),
        ((torch.randn(2, 3, 3), torch.randn(2, 3), torch.randn(2, 1, 3), 0), "`L`"),
        ((torch.randn(2, 3, 3), torch.randn(2, 3).double(), torch.randn(2, 1, 3), 5), "`dB`"),
        ((torch.randn(2, 3, 3).half(), torch.randn(2, 3), torch.randn(2, 1, 3), 5), "float32 or float64"),
        ((torch.randn(2, 3, 3), torch.randn(2, 3), torch.randn(2, 3), 5), "3 dimensions"),
    ],
)
def test_bad_input_raises_a_clear_error(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        krylov_kernel(*args)
