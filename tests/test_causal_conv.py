"""accel.ops.causal_conv against a direct sum in float64 (the definition) and the FFT reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from accel.ops import causal_conv
from accel.reference import lssl as reference
from conftest import assert_by_rule


def direct(u, K, D=None, activation=None, K_reverse=None):
    """The definition as sums over lags (no FFT)."""
    B, L, H = u.shape
    y = u.new_zeros(B, L, H, K.shape[1])
    for s in range(K.shape[2]):
        y[:, s:] += u[:, : L - s, :, None] * K[:, :, s]
    if K_reverse is not None:
        for s in range(K_reverse.shape[2]):
            if s + 1 < L:
                y[:, : L - 1 - s] += u[:, s + 1:, :, None] * K_reverse[:, :, s]
    if D is not None:
        y = y + u[..., None] * D
    return F.gelu(y) if activation == "gelu" else y


def run(fn, args, grad):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    y = fn(*leaves[:3], leaves[3], leaves[4])
    given = [a for a in leaves if isinstance(a, torch.Tensor)]
    return [y, *torch.autograd.grad(y, given, grad)]


# The op takes the direct Toeplitz product up to L = 128 and the FFT above: cases on both sides.
CASES = [  # (B, L, H, M, Lk, with D, activation, with K_reverse)
    (2, 33, 3, 1, 33, True, None, False),
    (1, 40, 17, 2, 25, True, "gelu", False),
    (3, 7, 2, 1, 7, False, None, True),
    (2, 50, 5, 2, 50, True, "gelu", True),
    (1, 1, 1, 1, 1, True, None, False),
    (1, 128, 3, 1, 128, True, "gelu", True),
    (2, 129, 3, 2, 97, True, "gelu", True),
    (1, 200, 4, 1, 200, False, None, False),
]


@pytest.mark.parametrize("B, L, H, M, Lk, with_D, activation, with_reverse", CASES)
def test_matches_the_direct_sum_by_the_numerics_rule(B, L, H, M, Lk, with_D, activation, with_reverse):
    u = torch.randn(B, L, H, dtype=torch.float64)
    K = torch.randn(H, M, Lk, dtype=torch.float64) / Lk ** 0.5
    D = torch.randn(H, M, dtype=torch.float64) if with_D else None
    Kr = torch.randn(H, M, Lk, dtype=torch.float64) / Lk ** 0.5 if with_reverse else None
    grad = torch.randn(B, L, H, M, dtype=torch.float64)
    args64 = (u, K, D, activation, Kr)
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args64)
    fast = run(causal_conv, args32, grad.float())
    ref32 = run(direct, args32, grad.float())
    ref64 = run(direct, args64, grad)
    names = ["y", "grad u", "grad K"] + (["grad D"] if with_D else []) + (["grad K_reverse"] if with_reverse else [])
    for name, f, r32, r64 in zip(names, fast, ref32, ref64):
        # The FFT adds every product in another order than the direct sums: float32 errors of the same size.
        assert_by_rule(f, r32, r64, name)


def test_gradcheck_float64():
    u = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    K = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    Kr = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv(a[0], a[1], a[2], "gelu", a[3]), (u, K, D, Kr))
    assert torch.autograd.gradcheck(lambda u, K: causal_conv(u, K), (u, K))
    # one channel: the direct sum over lags (L <= 128)
    K1, Kr1, D1 = (t.detach()[:, :1].clone().requires_grad_() for t in (K, Kr, D))
    assert torch.autograd.gradcheck(lambda *a: causal_conv(a[0], a[1], a[2], "gelu", a[3]), (u, K1, D1, Kr1))
    # the FFT path (L > 128)
    u = torch.randn(1, 130, 2, dtype=torch.float64, requires_grad=True)
    K, Kr = (torch.randn(2, 1, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv(a[0], a[1], a[2], "gelu", a[3]), (u, K, D, Kr))


def test_blocks_of_features_and_the_reference():
    # Long enough that the kernel splits the 70 features into blocks (63 + 7 at 64 MiB of spectra per block).
    u = torch.randn(2, 32768, 70, dtype=torch.float64, requires_grad=True)
    K = (torch.randn(70, 1, 300, dtype=torch.float64) / 20).requires_grad_()
    D = torch.randn(70, 1, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 32768, 70, 1, dtype=torch.float64)
    got = [causal_conv(u, K, D, "gelu")]
    got += torch.autograd.grad(got[0], [u, K, D], grad)
    want = [reference.causal_conv(u, K, D, "gelu")]
    want += torch.autograd.grad(want[0], [u, K, D], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_opcheck_compile_and_fallback():
    u = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    K = torch.randn(3, 2, 12, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    for args in ((u, K, D, "gelu", None), (u, K, None, None, K.detach().flip(-1).requires_grad_())):
        torch.library.opcheck(torch.ops.accel.causal_conv.default, args)
    compiled = torch.compile(lambda u, K, D: causal_conv(u, K, D, "gelu").sum(), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(u, K, D), [u, K, D])
    want = torch.autograd.grad(direct(u, K, D, "gelu").sum(), [u, K, D])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    module = importlib.import_module("accel.ops.causal_conv")
    grad = torch.randn(2, 12, 3, 2, dtype=torch.float64)
    for g, w in zip(module._reference_backward(grad, u.detach(), K.detach(), D.detach(), "gelu", None),
                    torch.ops.accel.causal_conv_backward(grad, u.detach(), K.detach(), D.detach(), "gelu", None)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda u, K: causal_conv(u[0], K), "3 dimensions"),
        (lambda u, K: causal_conv(u, K[:2]), "`K` must have shape"),
        (lambda u, K: causal_conv(u, torch.randn(3, 1, 20)), "`K` must have shape"),
        (lambda u, K: causal_conv(u, K, torch.randn(3, 2)), "`D` must have shape"),
        (lambda u, K: causal_conv(u, K, activation="relu"), "activation"),
        (lambda u, K: causal_conv(u.double(), K), "float32 or float64 like `u`"),
        (lambda u, K: causal_conv(u, K, K_reverse=torch.randn(3, 2, 4)), "`K_reverse`"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 10, 3), torch.randn(3, 1, 10))
