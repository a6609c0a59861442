"""accel.ops.depthwise_conv2d and accel.nn.DepthwiseConv2d against F.conv2d(groups=C) (the reference)."""
import copy

import pytest
import torch
from torch import nn

import accel.nn
from accel.ops import depthwise_conv2d
from accel.reference import depthwise_conv2d as reference
from conftest import assert_by_rule

# (N, C, H, W, kernel, stride, padding, dilation): DARTS' sep/dil convs at stride 1 and 2 (reduction edges),
# odd sizes whose last rows no stride-2 window reaches, asymmetric kernels, strides and paddings, no padding.
GEOMETRIES = [
    (2, 3, 8, 8, 3, 1, 1, 1),
    (3, 5, 9, 7, 5, 1, 2, 1),
    (2, 4, 11, 13, 3, 1, 2, 2),
    (1, 2, 17, 33, 5, 1, 4, 2),
    (2, 3, 7, 9, (3, 5), 1, (0, 2), 1),
    (1, 1, 1, 1, 1, 1, 0, 1),
    (2, 3, 9, 9, 3, 2, 1, 1),
    (2, 3, 8, 8, 5, 2, 2, 1),
    (2, 2, 10, 11, 3, 2, 2, 2),
    (1, 2, 13, 12, 5, 2, 4, 2),
    (2, 3, 9, 10, 3, (3, 2), (1, 0), 1),
    (1, 2, 12, 12, 9, 1, 4, 1),  # 81 taps: past the fused backward's limit, so ATen's
]


def run(fn, x, w, grad, geometry):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(x, w, *geometry)
    return [out, *torch.autograd.grad(out, [x, w], grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, C, H, W, k, stride, padding, dilation", GEOMETRIES)
def test_forward_and_gradients_follow_the_numerics_rule(N, C, H, W, k, stride, padding, dilation, dtype):
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w = torch.randn(N, C, H, W, dtype=torch.float64), torch.randn(C, 1, kh, kw, dtype=torch.float64)
    geometry = (stride, padding, dilation)
    out64 = reference.depthwise_conv2d(x, w, *geometry)
    grad = torch.randn(out64.shape, dtype=torch.float64)
    fast = run(depthwise_conv2d, x.to(dtype), w.to(dtype), grad.to(dtype), geometry)
    ref_d = run(reference.depthwise_conv2d, x.to(dtype), w.to(dtype), grad.to(dtype), geometry)
    ref64 = run(reference.depthwise_conv2d, x, w, grad, geometry)
    for name, f, rd, r64 in zip(["out", "grad x", "grad weight"], fast, ref_d, ref64):
        assert f.dtype == dtype
        assert_by_rule(f, rd, r64, name)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv2d(x, w, 1, 2, 2), (x, w))


def test_opcheck():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.accel.depthwise_conv2d.default, (x, w, [1, 1], [2, 2], [1, 1]))
    grad = torch.randn(2, 3, 6, 7)
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(torch.ops.accel.depthwise_conv2d_backward.default,
                              (grad, x.detach(), w.detach(), [1, 1], [2, 2], [1, 1], mask))


def test_only_the_needed_gradient_is_made():
    x = torch.randn(2, 3, 8, 8)  # an input that does not require grad, as a network's first layer
    w = torch.randn(3, 1, 3, 3, requires_grad=True)
    out = depthwise_conv2d(x, w, 1, 1, 1)
    (grad_w,) = torch.autograd.grad(out, [w], torch.ones_like(out))
    torch.testing.assert_close(grad_w, torch.autograd.grad(reference.depthwise_conv2d(x, w, 1, 1, 1), [w],
                                                           torch.ones_like(out))[0])
    grad_x, grad_none = torch.ops.accel.depthwise_conv2d_backward(torch.ones_like(out), x, w.detach(), [1, 1],
                                                                  [1, 1], [1, 1], [True, False])
    assert grad_none is None and grad_x.shape == x.shape


def test_non_contiguous_input_and_every_element_written(poisoned_outputs):
    x = torch.randn(2, 9, 8, 3, dtype=torch.float64).permute(0, 3, 2, 1)  # (2, 3, 8, 9), not contiguous
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    grad = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    for f, r in zip(run(depthwise_conv2d, x, w, grad, (1, 1, 1)), run(reference.depthwise_conv2d, x, w, grad, (1, 1, 1))):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, r)


def test_bitwise_deterministic_across_thread_counts():
    x, w = torch.randn(4, 6, 16, 16), torch.randn(6, 1, 5, 5)
    grad = torch.randn(4, 6, 16, 16)
    threads = torch.get_num_threads()
    first = run(depthwise_conv2d, x, w, grad, (1, 2, 1))
    try:
        torch.set_num_threads(1)
        single = run(depthwise_conv2d, x, w, grad, (1, 2, 1))
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(depthwise_conv2d, x, w, grad, (1, 2, 1)), single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, requires_grad=True)

    def f(x, w):
        return torch.relu(depthwise_conv2d(x, w, 1, 2, 2)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(torch.autograd.grad(compiled(x, w), [x, w]), torch.autograd.grad(f(x, w), [x, w])):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w: depthwise_conv2d(x[0], w), "4-D"),
        (lambda x, w: depthwise_conv2d(x, w[:2]), r"weight.*\(C, 1, kh, kw\)"),
        (lambda x, w: depthwise_conv2d(x, w.double()), "float32 or both float64"),
        (lambda x, w: depthwise_conv2d(x.half(), w.half()), "float32 or both float64"),
        (lambda x, w: depthwise_conv2d(x, w.to("meta")), "weight.*meta"),
        (lambda x, w: depthwise_conv2d(x, w, stride=0), "stride"),
        (lambda x, w: depthwise_conv2d(x, w, padding=-1), "padding"),
        (lambda x, w: depthwise_conv2d(x, w, dilation=(1, 2, 3)), "dilation"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3))


def test_kernel_larger_than_padded_input_raises():
    with pytest.raises(ValueError, match="output would be empty"):
        depthwise_conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 5, 5))


def test_module_is_a_drop_in_conv2d():
    conv = nn.Sequential(nn.Conv2d(4, 4, 5, padding=4, dilation=2, groups=4, bias=False), nn.Conv2d(4, 8, 1))
    fast = accel.nn.use_depthwise_kernels(copy.deepcopy(conv))
    assert isinstance(fast[0], accel.nn.DepthwiseConv2d) and type(fast[1]) is nn.Conv2d  # only depthwise ones
    assert list(fast.state_dict()) == list(conv.state_dict())
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
    shared = accel.nn.DepthwiseConv2d.from_conv(conv[0])
    assert shared.weight is conv[0].weight  # shares, does not copy
