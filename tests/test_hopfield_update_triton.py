"""The Triton forward and backward of hopfield_update (kernels/hopfield_update.py), run on CPU tensors under
TRITON_INTERPRET=1: outputs, the saved state patterns and row statistics, and the four gradients (stopped rows
included) against the float64 reference by the numerics rule."""
import importlib

import pytest
import torch

from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("hopfield_update")
pytorch_kernels = importlib.import_module("accel.ops.hopfield_update")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("B, H, L, S, D, DV, steps, shared, masked", [
    (2, 3, 5, 7, 4, 6, 2, False, False), (2, 2, 70, 130, 20, 9, 3, True, True), (1, 1, 17, 64, 16, 16, 0, False, True),
    (3, 1, 1, 1, 1, 1, 1, False, False),
])
def test_forward_and_saved_states_follow_the_numerics_rule(B, H, L, S, D, DV, steps, shared, masked):
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(1 if shared else B, H, S, D, dtype=torch.float64)
    v = torch.randn(1 if shared else B, H, S, DV, dtype=torch.float64)
    beta = torch.tensor(0.6, dtype=torch.float64)
    mask = None
    if masked:
        blocked = torch.rand(L, S) < 0.3
        blocked[:, 0] = False
        mask = torch.zeros(1, 1, L, S, dtype=torch.float64).masked_fill(blocked, -float("inf"))
    args32 = [t.float() if t is not None else None for t in (q, k, v, beta)] + [steps, None if mask is None else mask.float()]
    out, saved, stats = kernels.forward(*args32)
    want32 = pytorch_kernels._forward(*args32, None, False)
    want64 = pytorch_kernels._forward(q, k, v, beta, steps, mask, None, False)
    assert_by_rule(out, want32[0], want64[0], "out")
    assert_by_rule(saved, want32[2], want64[2], "saved q")
    assert_by_rule(stats, want32[3], want64[3], "row statistics")


def test_support_is_float32_without_stopping_or_extras():
    q = torch.zeros(1)
    assert kernels.supports(q, None, False)
    assert not kernels.supports(q.double(), None, False)
    assert not kernels.supports(q, 1e-4, False)
    assert not kernels.supports(q, None, True)


@pytest.mark.parametrize("B, H, L, S, D, DV, steps, shared, masked, eps, beta", [
    (2, 3, 5, 7, 4, 6, 1, False, False, None, 0.6), (2, 2, 70, 130, 20, 9, 3, True, True, None, 0.6),
    (1, 1, 17, 64, 16, 16, 0, False, True, None, 0.6), (3, 1, 1, 1, 1, 1, 1, False, False, None, 0.6),
    (2, 2, 20, 9, 5, 3, 3, False, True, 1e-2, 3.0), (3, 2, 33, 20, 8, 5, 3, True, False, 1e-2, 3.0),
])
def test_backward_follows_the_numerics_rule(B, H, L, S, D, DV, steps, shared, masked, eps, beta, poisoned_outputs):
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(1 if shared else B, H, S, D, dtype=torch.float64)
    v = torch.randn(1 if shared else B, H, S, DV, dtype=torch.float64)
    beta = torch.tensor(beta, dtype=torch.float64)
    grad = torch.randn(B, H, L, DV, dtype=torch.float64)
    mask = None
    if masked:
        blocked = torch.rand(L, S) < 0.3
        blocked[:, 0] = False
        mask = torch.zeros(1, 1, L, S, dtype=torch.float64).masked_fill(blocked, -float("inf"))
    inputs64 = (grad, q, k, v, beta, mask)
    inputs32 = tuple(t.float() if t is not None else None for t in inputs64)
    _, _, saved64, stats64, taken64 = pytorch_kernels._forward(q, k, v, beta, steps, mask, eps, False)
    _, _, saved32, stats32, taken32 = pytorch_kernels._forward(*inputs32[1:5], steps, inputs32[5], eps, False)
    if eps is not None:
        assert (taken32 < steps).any(), "no row stopped early: the case tests nothing"
        assert torch.equal(taken32, taken64), "float32 and float64 stopped different rows: not comparable"
    got = kernels.backward(*inputs32, saved32, stats32, taken32)
    want32 = pytorch_kernels._backward(*inputs32, saved32, stats32, taken32)
    want64 = pytorch_kernels._backward(*inputs64, saved64, stats64, taken64)
    for name, g, w32, w64 in zip(["grad q", "grad k", "grad v", "grad beta"], got, want32, want64):
        assert g.dtype == torch.float32, name
        assert_by_rule(g, w32, w64, name)


def test_backward_support_is_float32():
    assert kernels.supports_backward(torch.zeros(1))
    assert not kernels.supports_backward(torch.zeros(1, dtype=torch.float64))
