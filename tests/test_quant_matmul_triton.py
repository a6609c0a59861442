"""The Triton kernels of int8_linear and int4_linear (kernels/quant_matmul.py), run on CPU tensors under
TRITON_INTERPRET=1, against the C++ ops on the same packed weights."""
import pytest
import torch

from accel.ops import quantize
from conftest import interpreted_kernels

kernels = interpreted_kernels("quant_matmul")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("M, N, K", [(1, 3, 33), (17, 40, 96)])
def test_int8_matches_the_cpu_op(M, N, K):
    x, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    qw = quantize(w, 8)
    got = kernels.int8_linear(x, qw.codes, qw.step[:, 0], bias)
    want = torch.ops.accel.int8_linear(x, qw.codes, qw.step[:, 0].contiguous(), bias)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_int8_dot_products_past_2_to_the_31():
    """Codes of 127 over K = 140,032: the dot product 127 * 127 * K passes int32 (it wrapped to a negative total)."""
    K = 140_032
    x, w = torch.ones(1, K), torch.ones(2, K)
    w[1, ::2] = -1.0
    qw = quantize(w, 8)
    got = kernels.int8_linear(x, qw.codes, qw.step[:, 0], None)
    torch.testing.assert_close(got, torch.tensor([[float(K), 0.0]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M, N, Kp, G", [(1, 3, 64, 32), (18, 33, 256, 128)])
def test_int4_matches_the_cpu_op(M, N, Kp, G):
    x, w, bias = torch.randn(M, Kp), torch.randn(N, Kp), torch.randn(N)
    qw = quantize(w, 4, G, "minmax")
    got = kernels.int4_linear(x, qw.codes, qw.step, qw.offset, G, bias)
    want = torch.ops.accel.int4_linear(x, qw.codes, qw.step, qw.offset, G, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
