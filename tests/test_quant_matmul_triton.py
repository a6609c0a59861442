"""The Triton kernels of int8_linear and int4_linear (kernels/quant_matmul.py), run on CPU tensors under
TRITON_INTERPRET=1: the int8 products exactly against the integer product of the unpacked codes in int64, the
scaled int8 and int4 outputs by the numerics rule against the product of the unpacked codes (accel.reference.quant)
in float64 and in float32."""
import pytest
import torch

from accel.ops import quantize
from accel.ops.quantize import unpack_codes
from accel.reference import quant as reference
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("quant_matmul")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def integers(rows, K):
    """Integer values in [-127, 127] with 127 in every row: their int8 steps are exactly 1 and their codes the
    values themselves."""
    t = torch.randint(-127, 128, (rows, K)).float()
    t[torch.arange(rows), torch.randint(0, K, (rows,))] = 127.0
    return t


@pytest.mark.parametrize("M, N, K", [(1, 3, 33), (17, 40, 96), (5, 33, 1)])
def test_int8_integer_products_are_exact(M, N, K):
    x, w = integers(M, K), integers(N, K)
    bias = torch.randint(-1000, 1000, (N,)).float()
    qw = quantize(w, 8)
    got = kernels.int8_linear(x, qw.codes, qw.step[:, 0], bias)
    want = x.long() @ w.long().T + bias.long()  # below 2^24: exact in float32
    assert torch.equal(got, want.float())


def test_int8_dot_products_past_2_to_the_31():
    """Codes of +-127 over K = 140,032: the dot product 127 * 127 * K passes int32 (it wrapped to a negative total).
    16129 * 140032 = 8822563 * 2^8 is exact in float32, and the steps are 1."""
    K = 140_032
    x, w = torch.full((1, K), 127.0), torch.full((2, K), 127.0)
    w[1, ::2] = -127.0
    qw = quantize(w, 8)
    got = kernels.int8_linear(x, qw.codes, qw.step[:, 0], None)
    want = x.long() @ w.long().T
    assert want[0, 0] > 2 ** 31 and torch.equal(got, want.float())


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("M, N, K", [(1, 3, 33), (17, 40, 96)])
def test_int8_follows_the_numerics_rule(M, N, K, with_bias):
    x, w = torch.randn(M, K), torch.randn(N, K)
    bias = torch.randn(N) if with_bias else None
    qw = quantize(w, 8)
    step_w = qw.step[:, 0]
    got = kernels.int8_linear(x, qw.codes, step_w, bias)
    # the activations' codes as the op defines them: float32 steps max|x| / 127, round half to even
    step_x = x.abs().amax(1) / 127
    qx = torch.round(x / step_x[:, None]).clamp(-127, 127).long()
    products = qx @ unpack_codes(qw)[:, :K].long().T  # int64: exact
    want32 = products.float() * step_x[:, None] * step_w[None, :] + (0 if bias is None else bias)
    want64 = products.double() * step_x.double()[:, None] * step_w.double()[None, :] + (
        0 if bias is None else bias.double())
    assert_by_rule(got, want32, want64, "int8_linear")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("M, N, Kp, G", [(1, 3, 64, 32), (18, 33, 256, 128), (5, 7, 96, 32)])
def test_int4_follows_the_numerics_rule(M, N, Kp, G, with_bias):
    x, w = torch.randn(M, Kp), torch.randn(N, Kp)
    bias = torch.randn(N) if with_bias else None
    qw = quantize(w, 4, G, "minmax")
    got = kernels.int4_linear(x, qw.codes, qw.step, qw.offset, G, bias)
    w_hat = reference.dequantize(unpack_codes(qw), qw.step, qw.offset)  # float64
    want32 = x @ w_hat.float().T + (0 if bias is None else bias)
    want64 = x.double() @ w_hat.T + (0 if bias is None else bias.double())
    assert_by_rule(got, want32, want64, "int4_linear")
