"""The Triton kernel of binary_matmul (kernels/binary_matmul.py), run on CPU tensors under TRITON_INTERPRET=1:
the popcount dot products exactly against the sign products of the unpacked values (accel.reference.binary, in
float64: exact integers), the scale and bias epilogue by the numerics rule against the same reference in float64
and in float32, at odd sizes and word counts."""
import pytest
import torch

from accel.reference import binary as reference
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("binary_matmul")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (3, 5, 33), (17, 40, 300), (2, 33, 1000)])
def test_exact_dots_and_epilogue(M, N, K):
    x, w = torch.randn(M, K), torch.randn(N, K)
    x[0, 0] = 0.0  # 0 and -0.0 are +1
    w[-1, -1] = -0.0
    a, b = reference.pack_bits(x), reference.pack_bits(w)
    dots = reference.binary_matmul(x, w)
    got = kernels.forward(a, b, K, None, None)
    assert got.dtype == torch.int32 and torch.equal(got.long(), dots.long())
    for scale, bias in [(torch.rand(N), torch.randn(N)), (torch.rand(N), None), (None, torch.randn(N)),
                        (torch.rand(1), None)]:  # the last: one scale for the whole matrix
        got = kernels.forward(a, b, K, scale, bias)
        want32 = dots.float() * (1 if scale is None else scale) + (0 if bias is None else bias)
        want64 = reference.binary_matmul(x, w, scale, bias)
        assert got.dtype == torch.float32
        assert_by_rule(got, want32, want64, f"epilogue scale={scale is not None} bias={bias is not None}")

