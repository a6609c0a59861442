"""The Triton kernels of mixed_op (kernels/mixed_op.py), run on CPU tensors under TRITON_INTERPRET=1,
against the float64 reference with autograd."""
import pytest
import torch

from accel.ops.mixed_op import kernel_strides
from accel.reference import mixed_op as reference
from conftest import interpreted_kernels

kernels = interpreted_kernels("mixed_op")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_are_interpreted():
    assert kernels._INTERPRETED


def reference_results(ys, weights, tau, grad):
    """(out, grad_ys stacked as (K, *shape), grad_weights) of the float64 reference."""
    ys64 = [y.detach().double().requires_grad_() for y in ys]
    w64 = weights.detach().double().requires_grad_()
    out = reference.mixed_op(ys64, w64, tau)
    *grad_ys, grad_w = torch.autograd.grad(out, [*ys64, w64], grad.double(), allow_unused=True,
                                           materialize_grads=True)
    return out.detach(), torch.stack(grad_ys), grad_w


def assert_close(actual, expected, dtype, what):
    """max |actual - expected| <= tolerance * max |expected| (the numerics rule's scaled error)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    if expected.numel() == 0:
        return
    error = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-300)
    assert error <= TOLERANCE[dtype] * scale, f"{what}: error {error / scale:.3g} of scale {scale:.3g}"


def backward_stacked(grad, ys, weights, tau):
    """kernels.backward with its K separate grad_ys stacked as (K, *shape), for comparison."""
    grad_ys, grad_w = kernels.backward(grad, ys, weights, tau)
    assert len(grad_ys) == len(ys)
    return torch.stack(grad_ys), grad_w


def run_and_compare(ys, weights, tau, grad, clean_ys=None):
    """Runs both kernels and checks out, grad_ys and grad_weights against the reference on ``clean_ys``
    (the ys with switched-off branches made finite: the reference itself would compute 0 * inf)."""
    dtype = ys[0].dtype
    out = kernels.forward(ys, weights, tau)
    grad_ys, grad_w = backward_stacked(grad, ys, weights, tau)
    ref_out, ref_grad_ys, ref_grad_w = reference_results(clean_ys or ys, weights, tau, grad)
    assert_close(out, ref_out, dtype, "out")
    assert_close(grad_ys, ref_grad_ys, dtype, "grad_ys")
    assert_close(grad_w, ref_grad_w, weights.dtype, "grad_weights")
    return out, grad_ys, grad_w


@pytest.mark.parametrize("tau", [None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (1000,), (3, 1700)])  # the last spans 3 programs
def test_matches_reference(shape, K, dtype, tau):
    ys = [torch.randn(shape, dtype=dtype) for _ in range(K)]
    weights = torch.randn(K, dtype=dtype) if tau is not None else torch.rand(K, dtype=dtype) + 0.1
    run_and_compare(ys, weights, tau, torch.randn(shape, dtype=dtype))


@pytest.mark.parametrize("tau", [None, 0.7])
def test_bfloat16_with_float32_weights(tau):
    ys = [torch.randn(33, 7, dtype=torch.bfloat16) for _ in range(3)]
    weights = torch.randn(3)
    run_and_compare(ys, weights, tau, torch.randn(33, 7, dtype=torch.bfloat16))


def test_non_contiguous_operands_take_the_layout_of_ys0():
    shape = (6, 4, 5)
    ys = [
        torch.randn(4, 5, 6).permute(2, 0, 1),  # dense but permuted: its layout is the kernels'
        torch.randn(6, 4, 10)[..., ::2],  # strided: copied
        torch.randn(shape),  # contiguous, another layout: copied
    ]
    grad = torch.randn(1, 4, 5).expand(shape)  # expanded, as from a broadcast: copied
    weights = torch.rand(6)[::2]  # strided weights are read in place
    out, grad_ys, grad_w = run_and_compare(ys, weights, 0.9, grad)
    strides = kernel_strides(ys[0])
    assert out.stride() == strides
    assert all(dy.stride() == strides for dy in kernels.backward(grad, ys, weights, 0.9)[0])


@pytest.mark.parametrize("reverse", [False, True])
def test_branches_that_are_views_of_one_buffer(reverse):
    # 7 float32 apart (28 bytes): offsets not multiples of 16 bytes, negative ones when reversed.
    ys = list(torch.randn(4, 7).unbind(0))
    if reverse:
        ys = ys[::-1]
    _, _, vec = kernels.addresses(ys, True)
    assert vec == 1
    run_and_compare(ys, torch.randn(4), None, torch.randn(7))


def test_separate_allocations_keep_16_byte_alignment():
    _, offsets, vec = kernels.addresses([torch.randn(100) for _ in range(3)], True)
    assert vec == 4 and offsets[0] == 0


@pytest.mark.parametrize("tau", [None, 0.5])
def test_switched_off_branch_is_never_read(tau):
    K, shape = 4, (2, 333)
    clean = [torch.randn(shape) for _ in range(K)]
    poisoned = list(clean)
    poisoned[2] = torch.full(shape, float("nan"))
    poisoned[2][0] = float("inf")
    poisoned[2][1] = -float("inf")
    weights = torch.randn(K) if tau is not None else torch.rand(K) + 0.1
    # w_2 = 0 exactly: a zero weight, or through the softmax a logit of -inf.
    weights[2] = -float("inf") if tau is not None else 0.0
    _, grad_ys, grad_w = run_and_compare(poisoned, weights, tau, torch.randn(shape), clean_ys=clean)
    assert (grad_ys[2] == 0).all() and grad_w[2] == 0


# The interpreter computes 0 * inf before tl.where discards it; numpy warns about that.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_all_branches_off_gives_zeros():
    ys = [torch.full((9,), float("nan")) for _ in range(3)]
    grad = torch.tensor([float("inf"), float("nan"), -float("inf"), *torch.randn(6).tolist()])
    assert (kernels.forward(ys, torch.zeros(3), None) == 0).all()
    grad_ys, grad_w = backward_stacked(grad, ys, torch.zeros(3), None)
    assert (grad_ys == 0).all() and (grad_w == 0).all()


@pytest.mark.parametrize("tau", [None, 1.3])
def test_second_stage_sums_partials_then_applies_the_softmax_jacobian(tau):
    # As many partials as 600k elements give, fed directly: the interpreter would take long to make them.
    K = 8
    partial_dots = torch.randn(300, K, dtype=torch.float64)
    weights = torch.randn(K, dtype=torch.float64)
    dw = partial_dots.sum(0)
    if tau is not None:
        p = torch.softmax(weights / tau, 0)
        dw = p * (dw - (p * dw).sum()) / tau
    assert_close(kernels._weight_grad(partial_dots, weights, tau), dw, torch.float64, "grad_weights")


@pytest.mark.parametrize("tau", [None, 0.8])
def test_empty_tensors(tau):
    ys = [torch.randn(0, 3) for _ in range(3)]
    weights = torch.randn(3)
    out = kernels.forward(ys, weights, tau)
    assert out.shape == (0, 3)
    grad_ys, grad_w = backward_stacked(torch.randn(0, 3), ys, weights, tau)
    assert grad_ys.shape == (3, 0, 3)
    assert grad_w.shape == (3,) and (grad_w == 0).all()


def test_deterministic():
    shape = (5, 1001)  # 3 programs, a partial last block
    ys = [torch.randn(shape) for _ in range(3)]
    alpha, grad = torch.randn(3), torch.randn(shape)
    first = [kernels.forward(ys, alpha, 0.6), *backward_stacked(grad, ys, alpha, 0.6)]
    second = [kernels.forward(ys, alpha, 0.6), *backward_stacked(grad, ys, alpha, 0.6)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tau", [None, 1.3])
def test_every_output_element_is_written(poisoned_outputs, tau):
    assert torch.isnan(torch.empty(3)).all()  # the poisoning is on
    shape = (3, 1001)
    ys = [torch.randn(shape) for _ in range(4)]
    weights = torch.randn(4)
    weights[1] = 0.0 if tau is None else -float("inf")  # a switched-off branch's dy is written too
    out = kernels.forward(ys, weights, tau)
    grad_ys, grad_w = backward_stacked(torch.randn(shape), ys, weights, tau)
    for t in (out, grad_ys, grad_w):
        assert torch.isfinite(t).all()
