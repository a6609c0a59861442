"""The Triton kernels of mixed_op (kernels/mixed_op.py), run on CPU tensors under TRITON_INTERPRET=1,
judged by the numerics rule against accel.reference.mixed_op with autograd, run in float64 and in the inputs'
dtypes on the same values."""
import pytest
import torch

from accel.numerics import farthest, operand_scale
from accel.ops.mixed_op import kernel_strides
from accel.reference import mixed_op as reference
from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("mixed_op")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_are_interpreted():
    assert kernels._INTERPRETED


def reference_results(ys, weights, tau, grad):
    """(out, grad_ys stacked as (K, *shape), grad_weights) of the reference with autograd, in the inputs' dtypes."""
    ys = [y.detach().clone().requires_grad_() for y in ys]
    w = weights.detach().clone().requires_grad_()
    out = reference.mixed_op(ys, w, tau)
    *grad_ys, grad_w = torch.autograd.grad(out, [*ys, w], grad, allow_unused=True, materialize_grads=True)
    return out.detach(), torch.stack(grad_ys), grad_w


def backward_stacked(grad, ys, weights, tau):
    """kernels.backward with its K separate grad_ys stacked as (K, *shape), for comparison."""
    grad_ys, grad_w = kernels.backward(grad, ys, weights, tau)
    assert len(grad_ys) == len(ys)
    return torch.stack(grad_ys), grad_w


def run_and_compare(ys, weights, tau, grad, clean_ys=None):
    """Runs both kernels and judges out, grad_ys and grad_weights by the numerics rule against the reference in
    float64 and in the inputs' dtypes, on ``clean_ys`` (the ys with switched-off branches made finite: the
    reference itself would compute 0 * inf)."""
    dtype = ys[0].dtype
    out = kernels.forward(ys, weights, tau)
    grad_ys, grad_w = backward_stacked(grad, ys, weights, tau)
    clean = clean_ys or ys
    in_dtype = reference_results(clean, weights, tau, grad)
    ref64 = reference_results([y.double() for y in clean], weights.double(), tau, grad.double())
    if dtype == torch.bfloat16:
        # Triton's interpreter converts float32 to bfloat16 toward zero (the GPU rounds to nearest): the yardstick
        # is the larger of the reference's error and what that rounding of the exact result costs
        in_dtype = [farthest((r, truncated(r64)), r64) if r.dtype ==
                    torch.bfloat16 else r for r, r64 in zip(in_dtype, ref64)]
    # grad_weights sums <grad, y_k> over every element, and the softmax's Jacobian subtracts such sums: where they
    # cancel, the error is judged against the size of the terms g y / tau, not of the small result
    terms = operand_scale(grad) * operand_scale(*clean) / (tau or 1.0)
    for name, f, r, r64, want_dtype, scale in zip(["out", "grad_ys", "grad_weights"], (out, grad_ys, grad_w),
                                                  in_dtype, ref64, (dtype, dtype, weights.dtype), (0.0, 0.0, terms),
                                                  strict=True):
        assert f.dtype == want_dtype, f"{name}: dtype {f.dtype}, expected {want_dtype}"
        assert_by_rule(f, r, r64, f"{name} {dtype} tau={tau}", scale=scale)
    return out, grad_ys, grad_w


@pytest.mark.parametrize("tau", [None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (1000,), (3, 1700)])  # the last spans 3 programs
def test_matches_reference(shape, K, dtype, tau):
    ys = [torch.randn(shape, dtype=dtype) for _ in range(K)]
    weights = torch.randn(K, dtype=dtype) if tau is not None else torch.rand(K, dtype=dtype) + 0.1
    run_and_compare(ys, weights, tau, torch.randn(shape, dtype=dtype))


def truncated(t: torch.Tensor) -> torch.Tensor:
    """float64 values rounded toward zero to bfloat16: float32 first, then its low 16 bits dropped."""
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [None, 1.3])
def test_second_stage_sums_partials_then_applies_the_softmax_jacobian(tau, dtype):
    # As many partials as 600k elements give, fed directly: the interpreter would take long to make them.
    K = 8
    partial_dots = torch.randn(300, K, dtype=torch.float64)
    weights = torch.randn(K, dtype=torch.float64).to(dtype)
    dw = partial_dots.sum(0)

    def through_the_weights(w, dw):
        """The gradient dw of the mixing weights carried back to ``weights`` by autograd through the reference."""
        w = w.clone().requires_grad_()
        return torch.autograd.grad(reference.mixing_weights(w, tau), w, dw)[0]

    got = kernels._weight_grad(partial_dots, weights, tau)
    assert got.dtype == dtype
    assert_by_rule(got, through_the_weights(weights, dw.to(dtype)), through_the_weights(weights.double(), dw),
                   "grad_weights")


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
    for t in run_and_compare(ys, weights, tau, torch.randn(shape)):
        assert torch.isfinite(t).all()
