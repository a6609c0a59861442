"""accel.ops.quantize / dequantize / fake_quantize / quant_matmul: codes and error bounds of both schemes at 8, 4
and 2 bits with odd K, the int8 product exact against numpy integer arithmetic on the same codes, the 4-bit
weight-only product by the numerics rule, the straight-through gradient, opcheck and bad input."""
import numpy as np
import pytest
import torch

from accel.ops import dequantize, fake_quantize, quant_matmul, quantize
from accel.ops.quantize import unpack_codes
from accel.reference import quant as reference
from conftest import assert_by_rule


@pytest.mark.parametrize("bits, group_size, scheme", [(8, None, "symmetric"), (8, 64, "minmax"), (4, 32, "minmax"),
                                                      (4, 128, "symmetric"), (2, 64, "minmax")])
@pytest.mark.parametrize("K", [1, 33, 300])
def test_codes_and_error_bound(bits, group_size, scheme, K):
    w = torch.randn(7, K)
    qw = quantize(w, bits, group_size, scheme)
    codes = unpack_codes(qw)
    low, high = reference.levels(bits, scheme)
    assert codes.min() >= low and codes.max() <= high
    # the codes are the reference's on the first K values (the padding repeats the row's last value)
    ref_q, ref_step, ref_offset = reference.quantize(
        torch.cat([w, w[:, -1:].expand(-1, qw.padded_features - K)], 1), bits, qw.group_size, scheme)
    torch.testing.assert_close(codes.double(), ref_q, rtol=0, atol=0)
    # |w - w_hat| <= step / 2 within each group
    w_hat = dequantize(qw)
    assert w_hat.shape == w.shape
    step = qw.step.repeat_interleave(qw.group_size, dim=1)[:, :K]
    assert ((w_hat - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def numpy_int8_linear(x, w, bias):
    """Per-row symmetric codes of x and w in float32 as the op computes them, the product in int64."""
    x, w = x.numpy(), w.numpy()
    sx = np.abs(x).max(1) / np.float32(127)
    sw = np.abs(w).max(1) / np.float32(127)
    qx = np.clip(np.round(x / sx[:, None]), -127, 127).astype(np.int64)
    qw = np.clip(np.round(w / sw[:, None]), -127, 127).astype(np.int64)
    return (qx @ qw.T).astype(np.float64) * sx[:, None] * sw[None, :] + bias.numpy()


# rows by fours and their remainders (the VNNI path's tiles), and K ending on half a 64-code step
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (3, 7, 33), (2, 65, 1000), (9, 5, 4096), (6, 37, 96), (4, 33, 64),
                                     (7, 4, 2100)])
def test_int8_product_matches_integer_arithmetic(M, N, K):
    x, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    got = quant_matmul(x, quantize(w, 8), bias)
    np.testing.assert_allclose(got.numpy(), numpy_int8_linear(x, w, bias), rtol=2e-6, atol=2e-6)


def test_int8_rows_that_are_zero_or_nan():
    """A zero row quantizes to codes 0 (its output is the bias); a NaN anywhere in a row makes its step, and so its
    whole output row, NaN, however far the NaN sits from the row's largest value."""
    K, N = 300, 5
    x, w, bias = torch.randn(3, K), torch.randn(N, K), torch.randn(N)
    x[1] = 0.0
    x[2, 250] = float("nan")
    got = quant_matmul(x, quantize(w, 8), bias)
    np.testing.assert_allclose(got[:1].numpy(), numpy_int8_linear(x[:1], w, bias), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got[1], bias)
    assert got[2].isnan().all()


# group sizes 96 and 288 end each group on a 32-code chunk, 288 also spans two 256-code blocks of the AVX2 path;
# from 32 rows the CPU kernel dequantizes blocks of 256 channels and lets MKL multiply
@pytest.mark.parametrize("M, N, K, group_size", [(1, 3, 32, 32), (5, 17, 300, 64), (4, 9, 1024, 128), (6, 2, 40, 32),
                                                 (3, 5, 576, 96), (2, 3, 600, 288),
                                                 (23, 4, 256, 64), (32, 300, 256, 64)])
def test_weight_only_int4_by_the_numerics_rule(M, N, K, group_size):
    x, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    qw = quantize(w, 4, group_size, "minmax")
    got = quant_matmul(x, qw, bias)
    w_hat = dequantize(qw)
    ref32 = x @ w_hat.T + bias
    ref64 = x.double() @ w_hat.double().T + bias.double()
    assert_by_rule(got, ref32, ref64, "int4 weight-only")


def test_weight_only_int4_keeps_float_accuracy_over_a_wide_range():
    """The AVX2 path multiplies the activations as three int8 digits of the row's largest value: small entries
    beside a large one (1e-6 of it) and rows that are zero, NaN or infinite must still come out as in float."""
    K, N = 256, 6
    x = torch.randn(4, K) * 1e-3
    x[0, 7] = 1e3
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3, 9] = float("inf")
    w, bias = torch.randn(N, K), torch.randn(N)
    qw = quantize(w, 4, 64, "minmax")
    got = quant_matmul(x, qw, bias)
    w_hat = dequantize(qw)
    assert_by_rule(got[:2], x[:2] @ w_hat.T + bias, x[:2].double() @ w_hat.double().T + bias.double(), "int4 range")
    assert got[2].isnan().all()
    assert not got[3].isfinite().any()


@pytest.mark.parametrize("group_size", [256, 512])
def test_weight_only_int4_at_the_bounds_of_the_int16_sums(group_size):
    """Activations of magnitude 1 with the codes at 0 and 15 where they are negative and positive: every product of
    a code by an activation's leading digit (127) is at its largest, so the AVX2 path's int16 sums over 256 codes
    come near their bound (16 * 8 * 127 as centred sums, 8 * 3810 of 32767 for the uncentred pairs)."""
    K = 1024
    signs = torch.randint(0, 2, (2, K)).float() * 2 - 1
    x = signs.clone()
    w = torch.stack([signs[0], signs[1], -signs[0], signs[0] * signs[1]])  # codes 0 and 15 only
    qw = quantize(w, 4, group_size, "minmax")
    assert set(unpack_codes(qw).unique().tolist()) == {0, 15}
    got = quant_matmul(x, qw)
    w_hat = dequantize(qw)
    assert_by_rule(got, x @ w_hat.T, x.double() @ w_hat.double().T, "int4 at the bounds")


def test_other_combinations_dequantize():
    x, w = torch.randn(3, 70), torch.randn(4, 70)
    qw = quantize(w, 2, 64, "minmax")
    torch.testing.assert_close(quant_matmul(x, qw), x @ dequantize(qw).T)


def test_fake_quantize_passes_the_gradient_straight_through():
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    y = fake_quantize(x, 4, 32, "minmax")
    torch.testing.assert_close(y, reference.fake_quantize(x.detach(), 4, 32, "minmax"))
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g)
    torch.library.opcheck(torch.ops.accel.fake_quantize.default,
                          (x.detach().requires_grad_(), 4, 32, "minmax", "straight_through"))


@pytest.mark.parametrize("bits, group_size, scheme, extremes", [
    (4, 32, "minmax", 2), (2, 64, "minmax", 2), (8, None, "symmetric", 1), (4, 32, "symmetric", 1)])
def test_fake_quantize_scale_gradient_is_polinos(bits, group_size, scheme, extremes):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 128, dtype=torch.float64)
    g = torch.randn_like(x)
    fast = x.clone().requires_grad_()
    fake_quantize(fast, bits, group_size, scheme, "scale").backward(g)
    slow = x.clone().requires_grad_()
    y = reference.fake_quantize_through_scale(slow, bits, group_size, scheme)
    y.backward(g)
    torch.testing.assert_close(fake_quantize(x, bits, group_size, scheme), y.detach())
    torch.testing.assert_close(fast.grad, slow.grad)
    # beyond the straight-through gradient, only each group's max and min (or largest |x|) get something
    groups = x.numel() // (group_size or x.shape[-1])
    assert int(((fast.grad - g).abs() > 1e-12).sum()) == extremes * groups
    x32 = x.float().requires_grad_()
    fake_quantize(x32, bits, group_size, scheme, "scale").backward(g.float())
    torch.testing.assert_close(x32.grad.double(), slow.grad, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.accel.fake_quantize.default,
                          (x32.detach().requires_grad_(), bits, group_size or 0, scheme, "scale"))


def test_opcheck():
    x, w = torch.randn(3, 64), torch.randn(5, 64)
    q8, q4 = quantize(w, 8), quantize(w, 4, 32, "minmax")
    torch.library.opcheck(torch.ops.accel.int8_linear.default, (x, q8.codes, q8.step[:, 0], torch.randn(5)))
    torch.library.opcheck(torch.ops.accel.int4_linear.default, (x, q4.codes, q4.step, q4.offset, 32, None))


@pytest.mark.parametrize("call, match", [
    (lambda w, x: quantize(w, 3), "`bits`"),
    (lambda w, x: quantize(w, 4, 48, "minmax"), "`group_size`"),
    (lambda w, x: quantize(w, 8, None, "log"), "`scheme`"),
    (lambda w, x: quantize(w[0], 8), "`w`"),
    (lambda w, x: quant_matmul(x[:, :10], quantize(w, 8)), "features"),
    (lambda w, x: quant_matmul(x, w), "`qweight`"),
    (lambda w, x: quant_matmul(x, quantize(w, 8), torch.ones(3)), "`bias`"),
    (lambda w, x: fake_quantize(x[:, :40], 4, 32, "minmax"), "multiple"),
    (lambda w, x: fake_quantize(x, 4, 32, "minmax", "truncated"), "`gradient`"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(torch.randn(5, 64), torch.randn(3, 64))
