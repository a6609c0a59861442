"""The Triton path of krylov_kernel (kernels/krylov_kernel.py: Triton chains, batched products), run on CPU
tensors under TRITON_INTERPRET=1, against the definition in float64 and the C++ kernel's gradients."""
import pytest
import torch

from accel.reference import lssl as reference
from conftest import interpreted_kernels
from test_krylov_kernel import system

kernels = interpreted_kernels("krylov_kernel")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("R, N, T", [(1, 5, 7), (3, 8, 4), (2, 20, 3), (1, 3, 1)])
def test_chain_is_the_recurrence(R, N, T, backwards):
    H = 2
    x0, mat = torch.randn(H, R, N, dtype=torch.float64), torch.randn(H, N, N, dtype=torch.float64) / N ** 0.5
    adds = torch.randn(H, T, R, N, dtype=torch.float64)
    got = kernels.chain(x0, mat, adds, T, backwards)
    order = range(T - 1, -1, -1) if backwards else range(T)
    want, x = torch.empty_like(adds), x0
    for k, t in enumerate(order):
        x = x0 if k == 0 else x @ mat + adds[:, t]
        want[:, t] = x
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    no_adds = kernels.chain(x0, mat, None, T, backwards)
    torch.testing.assert_close(no_adds[:, T - 1 if backwards else 0], x0)


@pytest.mark.parametrize("H, N, M, L", [(2, 6, 1, 40), (3, 5, 2, 17), (1, 4, 1, 1), (2, 8, 3, 64)])
def test_forward_and_backward_match_the_cpu_kernel(H, N, M, L):
    dA, dB, C = system(H, N, M)
    grad = torch.randn(H, M, L, dtype=torch.float64)
    K = kernels.forward(dA, dB, C, L)
    torch.testing.assert_close(K, reference.krylov_naive(dA, dB, C, L), rtol=1e-10, atol=1e-12)
    got = kernels.backward(grad, dA, dB, C, L)
    want = torch.ops.accel.krylov_kernel_backward(grad, dA, dB, C, L)
    for name, g, w in zip(["grad dA", "grad dB", "grad C"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_float32_inputs_give_float32_results():
    dA, dB, C = (t.float() for t in system(2, 4, 1))
    K = kernels.forward(dA, dB, C, 10)
    grads = kernels.backward(torch.randn(2, 1, 10), dA, dB, C, 10)
    assert K.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(K, torch.ops.accel.krylov_kernel(dA, dB, C, 10))
