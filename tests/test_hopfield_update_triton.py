"""The Triton forward of hopfield_update (kernels/hopfield_update.py), run on CPU tensors under
TRITON_INTERPRET=1: outputs and the saved state patterns against the float64 reference by the numerics rule."""
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
    out, saved = kernels.forward(*args32)
    want32 = pytorch_kernels._forward(*args32, None, False, False)
    want64 = pytorch_kernels._forward(q, k, v, beta, steps, mask, None, False, False)
    assert_by_rule(out, want32[0], want64[0], "out")
    assert_by_rule(saved, want32[2], want64[2], "saved q")


def test_support_is_float32_without_stopping_or_extras():
    q = torch.zeros(1)
    assert kernels.supports(q, None, False, False)
    assert not kernels.supports(q.double(), None, False, False)
    assert not kernels.supports(q, 1e-4, False, False)
    assert not kernels.supports(q, None, True, False)
