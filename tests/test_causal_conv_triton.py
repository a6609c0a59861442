"""The Triton path of causal_conv (kernels/causal_conv.py: FFTs with the fused epilogue and gradient passes),
run on CPU tensors under TRITON_INTERPRET=1, against the C++ kernel's op."""
import pytest
import torch

from conftest import interpreted_kernels

kernels = interpreted_kernels("causal_conv")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_D, with_reverse", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("B, L, H, M, Lk", [(2, 70, 3, 1, 70), (1, 33, 5, 2, 20), (3, 5, 40, 1, 5)])
def test_forward_and_backward_match_the_op(B, L, H, M, Lk, with_D, with_reverse, activation, dtype, tol):
    u = torch.randn(B, L, H, dtype=dtype)
    K = torch.randn(H, M, Lk, dtype=dtype) / Lk ** 0.5
    D = torch.randn(H, M, dtype=dtype) if with_D else None
    Kr = torch.randn(H, M, Lk, dtype=dtype) / Lk ** 0.5 if with_reverse else None
    grad = torch.randn(B, L, H, M, dtype=dtype)
    args = (u, K, D, activation, Kr)
    y = kernels.forward(*args)
    grads = kernels.backward(grad, *args)
    want = [torch.ops.accel.causal_conv(*args), *torch.ops.accel.causal_conv_backward(grad, *args)]
    for name, got, expected in zip(["y", "grad u", "grad K", "grad D", "grad K_reverse"], [y, *grads], want):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if expected.numel():  # grad D and grad K_reverse are empty when D or K_reverse is not given
            assert (got - expected).abs().max().item() <= tol * max(expected.abs().max().item(), 1.0), name


def test_every_output_element_is_written(poisoned_outputs):
    u, K, D = torch.randn(2, 130, 35), torch.randn(35, 1, 130), torch.randn(35, 1)  # partial tiles on both axes
    y = kernels.forward(u, K, D, "gelu", None)
    grads = kernels.backward(torch.randn_like(y), u, K, D, "gelu", None)
    assert all(torch.isfinite(t).all() for t in (y, *grads))
