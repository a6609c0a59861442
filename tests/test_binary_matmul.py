"""accel.ops.pack_bits, unpack_bits, binary_matmul and binary_linear against an independent bit-level reference
in numpy (packbits, XOR, bitwise_count): exact integers at odd K, M and N, the fused epilogue, packed outputs,
non-contiguous inputs, opcheck, and bad input."""
import numpy as np
import pytest
import torch

from accel.ops import binary_linear, binary_matmul, pack_bits, unpack_bits


def numpy_pack(x: torch.Tensor) -> np.ndarray:
    """Sign bits (1 for x < 0) of the rows of x (R, K), little-endian within each 32-bit word, as int32."""
    bits = (x.numpy() < 0).astype(np.uint8)
    K = bits.shape[1]
    padded = np.zeros((bits.shape[0], -(-K // 32) * 32), np.uint8)
    padded[:, :K] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").view(np.int32)


def numpy_dots(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """K - 2 popcount(a XOR b) for every pair of rows."""
    pa, pb = numpy_pack(a).view(np.uint32), numpy_pack(b).view(np.uint32)
    differing = np.bitwise_count(pa[:, None, :] ^ pb[None, :, :]).sum(-1).astype(np.int64)
    return a.shape[1] - 2 * differing


@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 1000])
def test_pack_bits_matches_numpy_and_round_trips(K):
    x = torch.randn(7, K)
    x[0, 0] = 0.0  # 0 and -0.0 map to +1 (bit 0)
    x[1, 0] = -0.0
    packed = pack_bits(x)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-K // 32))
    np.testing.assert_array_equal(packed.numpy(), numpy_pack(x))
    values = unpack_bits(packed, K)
    torch.testing.assert_close(values, torch.where(x < 0, -1.0, 1.0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_pack_bits_other_dtypes_and_dims(dtype):
    x = torch.randn(3, 45, 5).to(dtype)  # pack along a middle dimension, non-contiguous after movedim
    packed = pack_bits(x, dim=1)
    assert packed.shape == (3, 2, 5)
    expected = numpy_pack(x.float().transpose(1, 2).reshape(-1, 45)).reshape(3, 5, 2).transpose(0, 2, 1)
    np.testing.assert_array_equal(packed.numpy(), expected)


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (1, 7, 31), (3, 5, 33), (9, 11, 1000), (64, 67, 257), (5, 130, 4096)])
def test_binary_matmul_is_exact(M, N, K):
    a, b = torch.randn(M, K), torch.randn(N, K)
    got = binary_matmul(pack_bits(a), pack_bits(b), K)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), numpy_dots(a, b))


def test_epilogue_scale_bias_and_packed_output():
    M, N, K = 6, 37, 70
    a, w = torch.randn(M, K), torch.randn(N, K)
    alpha, bias = w.abs().mean(1), torch.randn(N)
    dots = torch.from_numpy(numpy_dots(a, w)).double()
    expected = dots * alpha.double() + bias.double()
    got = binary_matmul(pack_bits(a), pack_bits(w), K, scale=alpha, bias=bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    scalar = binary_matmul(pack_bits(a), pack_bits(w), K, scale=0.25)
    torch.testing.assert_close(scalar.double(), dots * 0.25, rtol=0, atol=0)
    bits = binary_matmul(pack_bits(a), pack_bits(w), K, scale=alpha, bias=bias, output="bits")
    np.testing.assert_array_equal(bits.numpy(), numpy_pack(expected.float()))
    # float activations, binarized and packed inside
    torch.testing.assert_close(binary_linear(a, pack_bits(w), scale=alpha, bias=bias), got, rtol=0, atol=0)


def test_leading_dimensions_and_non_contiguous_operands():
    a = torch.randn(2, 3, 40)
    w = torch.randn(40, 9).T  # (9, 40), transposed view
    got = binary_matmul(pack_bits(a), pack_bits(w), 40)
    assert got.shape == (2, 3, 9)
    np.testing.assert_array_equal(got.reshape(6, 9).numpy(), numpy_dots(a.reshape(6, 40), w.contiguous()))
    packed_w = pack_bits(torch.randn(9, 64))
    wide = torch.zeros(9, 4, dtype=torch.int32)
    wide[:, ::2] = packed_w
    x = pack_bits(torch.randn(3, 64))
    np.testing.assert_array_equal(binary_matmul(x, wide[:, ::2], 64).numpy(), binary_matmul(x, packed_w, 64).numpy())


def test_opcheck():
    a, b = pack_bits(torch.randn(3, 40)), pack_bits(torch.randn(5, 40))
    torch.library.opcheck(torch.ops.accel.binary_matmul.default, (a, b, 40, None, None))
    torch.library.opcheck(torch.ops.accel.binary_matmul.default, (a, b, 40, torch.rand(5), torch.randn(5)))
    torch.library.opcheck(torch.ops.accel.pack_bits.default, (torch.randn(4, 70),))


BAD = [
    (lambda a, b: binary_matmul(a.float(), b, 40), "`a_bits`"),
    (lambda a, b: binary_matmul(a, b[:, :1], 40), "words"),
    (lambda a, b: binary_matmul(a, b, 70), "`k`"),
    (lambda a, b: binary_matmul(a, b, 40, scale=torch.ones(4)), "`scale`"),
    (lambda a, b: binary_matmul(a, b, 40, bias=torch.ones(5, 1)), "`bias`"),
    (lambda a, b: binary_matmul(a, b, 40, scale=1.0, output="int"), "`output='int'`"),
    (lambda a, b: binary_matmul(a, b, 40, output="half"), "`output`"),
    (lambda a, b: pack_bits(torch.ones(3, dtype=torch.int64)), "`x`"),
    (lambda a, b: pack_bits(torch.ones(3), dim=2), "`dim`"),
    (lambda a, b: unpack_bits(a, 65), "`k`"),
    (lambda a, b: binary_linear(torch.randn(3, 41), b, 40), "`x`"),
]


@pytest.mark.parametrize("call, match", BAD)
def test_bad_input_raises_a_clear_error(call, match):
    a, b = pack_bits(torch.randn(3, 40)), pack_bits(torch.randn(5, 40))
    with pytest.raises((TypeError, ValueError), match=match):
        call(a, b)
