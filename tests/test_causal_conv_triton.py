"""The Triton path of causal_conv (kernels/causal_conv.py: FFTs with the fused epilogue and gradient passes),
run on CPU tensors under TRITON_INTERPRET=1, judged by the numerics rule against accel.reference.lssl.causal_conv
and its autograd gradients, run in float64 and in the kernels' dtype on the same rounded inputs."""
import pytest
import torch

from accel.reference import lssl as reference
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("causal_conv")

NAMES = ["y", "grad u", "grad K", "grad D", "grad K_reverse"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference_results(grad, u, K, D, activation, K_reverse):
    """[y, grad u, grad K, grad D, grad K_reverse] of the reference in the inputs' dtype (empty gradients for the
    kernels that are not given, as the kernels return them)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (u, K, D, K_reverse)]
    y = reference.causal_conv(leaves[0], leaves[1], leaves[2], activation, leaves[3])
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, given, grad))
    gu, gK, gD, gKr = (next(grads) if t is not None else u.new_empty(0) for t in leaves)
    return [y.detach(), gu, gK, gD, gKr]


def run_and_judge(grad, u, K, D, activation, K_reverse):
    fast = [kernels.forward(u, K, D, activation, K_reverse), *kernels.backward(grad, u, K, D, activation, K_reverse)]
    in_dtype = reference_results(grad, u, K, D, activation, K_reverse)
    ref64 = reference_results(*(t.double() if t is not None else None for t in (grad, u, K, D)), activation,
                              K_reverse.double() if K_reverse is not None else None)
    for name, f, r, r64 in zip(NAMES, fast, in_dtype, ref64, strict=True):
        assert f.dtype == u.dtype and f.shape == r64.shape, name
        assert_by_rule(f, r, r64, f"{name} {u.dtype} {activation}")
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_D, with_reverse", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("B, L, H, M, Lk", [(2, 70, 3, 1, 70), (1, 33, 5, 2, 20), (3, 5, 40, 1, 5)])
def test_forward_and_backward_follow_the_numerics_rule(B, L, H, M, Lk, with_D, with_reverse, activation, dtype):
    u = torch.randn(B, L, H, dtype=torch.float64).to(dtype)
    K = (torch.randn(H, M, Lk, dtype=torch.float64) / Lk ** 0.5).to(dtype)
    D = torch.randn(H, M, dtype=torch.float64).to(dtype) if with_D else None
    Kr = (torch.randn(H, M, Lk, dtype=torch.float64) / Lk ** 0.5).to(dtype) if with_reverse else None
    grad = torch.randn(B, L, H, M, dtype=torch.float64).to(dtype)
    run_and_judge(grad, u, K, D, activation, Kr)


def test_non_contiguous_inputs():
    u = torch.randn(2, 3, 17).transpose(1, 2)  # (B, L, H) with time and features swapped in memory
    K = torch.randn(3, 2, 20)[..., ::2]
    D = torch.randn(2, 3).T
    grad = torch.randn(2, 17, 2, 3).transpose(2, 3)
    run_and_judge(grad, u, K, D, "gelu", None)


def test_every_output_element_is_written(poisoned_outputs):
    u, K, D = torch.randn(2, 130, 35), torch.randn(35, 1, 130) / 130 ** 0.5, torch.randn(35, 1)  # partial tiles
    fast = run_and_judge(torch.randn(2, 130, 35, 1), u, K, D, "gelu", None)
    assert all(torch.isfinite(t).all() for t in fast)
