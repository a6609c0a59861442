"""The Triton path of krylov_kernel (kernels/krylov_kernel.py: Triton chains, batched products), run on CPU
tensors under TRITON_INTERPRET=1, judged by the numerics rule against the definition, accel.reference.lssl's
krylov_naive (L mat-vecs) with its autograd gradients, run in float64 and in the inputs' dtype on the same rounded
inputs; the chain kernel against its recurrence written out."""
import pytest
import torch

from accel.reference import lssl as reference
from conftest import assert_by_rule, interpreted_kernels
from test_krylov_kernel import system

kernels = interpreted_kernels("krylov_kernel")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def recurrence(x0, mat, adds, T, backwards):
    """x_t = x_{t-1} @ mat + adds_t from x0 (from the last step down when backwards), in the inputs' dtype."""
    order = range(T - 1, -1, -1) if backwards else range(T)
    out, x = torch.empty(x0.shape[0], T, *x0.shape[1:], dtype=x0.dtype), x0
    for n, t in enumerate(order):
        x = x0 if n == 0 else x @ mat + (adds[:, t] if adds is not None else 0)
        out[:, t] = x
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("R, N, T", [(1, 5, 7), (3, 8, 4), (2, 20, 3), (1, 3, 1)])
def test_chain_is_the_recurrence(R, N, T, backwards, dtype):
    H = 2
    x0 = torch.randn(H, R, N, dtype=torch.float64).to(dtype)
    mat = (torch.randn(H, N, N, dtype=torch.float64) / N ** 0.5).to(dtype)
    adds = torch.randn(H, T, R, N, dtype=torch.float64).to(dtype)
    for a in (adds, None):
        got = kernels.chain(x0, mat, a, T, backwards)
        want64 = recurrence(x0.double(), mat.double(), a.double() if a is not None else None, T, backwards)
        assert got.dtype == dtype
        assert_by_rule(got, recurrence(x0, mat, a, T, backwards), want64, f"chain adds={a is not None} {dtype}")


def reference_results(dA, dB, C, L, grad):
    """[K, grad dA, grad dB, grad C] of krylov_naive in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (dA, dB, C)]
    K = reference.krylov_naive(*leaves, L)
    return [K.detach(), *torch.autograd.grad(K, leaves, grad, allow_unused=True, materialize_grads=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H, N, M, L", [(2, 6, 1, 40), (3, 5, 2, 17), (1, 4, 1, 1), (2, 8, 3, 64)])
def test_forward_and_backward_follow_the_numerics_rule(H, N, M, L, dtype):
    dA, dB, C = system(H, N, M, dtype)
    grad = torch.randn(H, M, L, dtype=torch.float64).to(dtype)
    fast = [kernels.forward(dA, dB, C, L), *kernels.backward(grad, dA, dB, C, L)]
    in_dtype = reference_results(dA, dB, C, L, grad)
    ref64 = reference_results(dA.double(), dB.double(), C.double(), L, grad.double())
    for name, f, r, r64 in zip(["K", "grad dA", "grad dB", "grad C"], fast, in_dtype, ref64, strict=True):
        assert f.dtype == dtype, name
        assert_by_rule(f, r, r64, f"{name} {dtype}")
