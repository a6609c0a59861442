"""The Triton kernel of binary_matmul (kernels/binary_matmul.py), run on CPU tensors under TRITON_INTERPRET=1:
exact integers and the fused epilogue against the C++ op, at odd sizes and word counts."""
import numpy as np
import pytest
import torch

from accel.ops import pack_bits
from conftest import interpreted_kernels

kernels = interpreted_kernels("binary_matmul")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (3, 5, 33), (17, 40, 300), (2, 33, 1000)])
def test_exact_dots_and_epilogue(M, N, K):
    a, b = pack_bits(torch.randn(M, K)), pack_bits(torch.randn(N, K))
    np.testing.assert_array_equal(kernels.forward(a, b, K, None, None).numpy(),
                                  torch.ops.accel.binary_matmul(a, b, K, None, None).numpy())
    scale, bias = torch.rand(N), torch.randn(N)
    torch.testing.assert_close(kernels.forward(a, b, K, scale, bias),
                               torch.ops.accel.binary_matmul(a, b, K, scale, bias), rtol=0, atol=0)
    one = torch.tensor([0.5])
    torch.testing.assert_close(kernels.forward(a, b, K, one, None),
                               torch.ops.accel.binary_matmul(a, b, K, one, None), rtol=0, atol=0)
