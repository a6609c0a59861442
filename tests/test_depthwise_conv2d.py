"""accel.ops.depthwise_conv2d and accel.nn.DepthwiseConv2d against the formula of accel/reference/depthwise_conv2d.py
evaluated as written (a sum of shifted slices, no ATen convolution), and which backward ran."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accel.nn
from accel import _extension
from accel.ops import depthwise_conv2d
from accel.numerics import farthest
from accel.reference import depthwise_conv2d as reference
from conftest import assert_by_rule

# (N, C, H, W, kernel, stride, padding, dilation, backward). backward: the one the C++ op is meant to run,
# "fused" (its own pass, csrc/cpu/depthwise_conv2d.cpp) or "aten" (its fallback, at::convolution_backward, taken
# past 64 taps or with a padding past the dilated kernel's reach, (k - 1) * dilation, in either dimension).
# DARTS' sep/dil convs at stride 1 and 2 (reduction edges), odd sizes whose last rows no stride-2 window reaches,
# asymmetric kernels, strides and paddings, no padding, and both sides of each fallback condition.
GEOMETRIES = [
    (2, 3, 8, 8, 3, 1, 1, 1, "fused"),
    (3, 5, 9, 7, 5, 1, 2, 1, "fused"),
    (2, 4, 11, 13, 3, 1, 2, 2, "fused"),
    (1, 2, 17, 33, 5, 1, 4, 2, "fused"),  # padding at the reach, tiles of 16 columns and a remainder
    (2, 3, 7, 9, (3, 5), 1, (0, 2), 1, "fused"),
    (1, 1, 1, 1, 1, 1, 0, 1, "fused"),
    (2, 3, 9, 9, 3, 2, 1, 1, "fused"),
    (2, 3, 8, 8, 5, 2, 2, 1, "fused"),
    (2, 2, 10, 11, 3, 2, 2, 2, "fused"),
    (1, 2, 13, 12, 5, 2, 4, 2, "fused"),
    (2, 3, 9, 10, 3, (3, 2), (1, 0), 1, "fused"),
    (1, 2, 11, 12, 8, 1, 3, 1, "fused"),  # 64 taps, the most the fused path takes
    (1, 2, 12, 12, 9, 1, 4, 1, "aten"),  # 81 taps
    (1, 2, 9, 16, (5, 13), 1, (2, 6), 1, "aten"),  # 65 taps
    (2, 3, 7, 8, 3, 1, 3, 1, "aten"),  # padding 3 past the reach 2
    (2, 3, 9, 9, 3, 2, (1, 3), 1, "aten"),  # past the reach in the width only, at stride 2
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def taps(x, w, stride, padding, dilation):
    """out[n, c, i, j] = sum_{a, b} w[c, 0, a, b] * x_padded[n, c, i*s + a*d, j*s + b*d], one shifted, strided slice
    of the zero-padded input per tap; autograd differentiates it through slices and products. Neither the op's
    forward (ATen's conv2d) nor its fallback backward (ATen's) is judged against itself."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    kh, kw = w.shape[2:]
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = 0
    for a in range(kh):
        for b in range(kw):
            window = xp[:, :, a * dh:a * dh + (oh - 1) * sh + 1:sh, b * dw:b * dw + (ow - 1) * sw + 1:sw]
            out = out + w[:, 0, a, b].view(1, -1, 1, 1) * window
    return out


def run(fn, x, w, grad, geometry):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(x, w, *geometry)
    return [out, *torch.autograd.grad(out, [x, w], grad)]


def with_backward_seen(fn):
    """fn()'s result and the backward the op ran, read from what the dispatcher ran meanwhile (the profiler):
    "aten" where at::convolution_backward ran (the C++ op's fallback, or the reference backward without the
    extension), else "fused"."""
    with torch.autograd.profiler.profile() as prof:
        result = fn()
    names = {e.name for e in prof.function_events}
    assert "accel::depthwise_conv2d_backward" in names  # the op's backward, not autograd's through an ATen conv
    return result, "aten" if "aten::convolution_backward" in names else "fused"


def assert_follows_rule(fast, x, w, grad, geometry, names=("out", "grad x", "grad weight")):
    """fast: the op's outputs in x's dtype on x, w and grad rounded to it (float64 tensors), judged by the rule
    against taps() in float64. The reference's own error in the dtype is the worse of taps() run in it and of
    the float64 taps() on the rounded inputs, rounded (the rounding alone, as tests/test_properties.py's by_rule)."""
    dtype = fast[0].dtype
    rounded = [t.to(dtype) for t in (x, w, grad)]
    ref64 = run(taps, x, w, grad, geometry)
    ref_d = run(taps, *rounded, geometry)
    rounding = [t.to(dtype) for t in run(taps, *[t.double() for t in rounded], geometry)]
    for name, f, r64, *candidates in zip(names, fast, ref64, ref_d, rounding):
        if f is None:
            continue
        assert f.dtype == dtype, name
        assert_by_rule(f, farthest(candidates, r64), r64, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, C, H, W, k, stride, padding, dilation, backward", GEOMETRIES)
def test_forward_and_gradients_follow_the_numerics_rule(N, C, H, W, k, stride, padding, dilation, backward, dtype):
    kh, kw = pair(k)
    x, w = torch.randn(N, C, H, W, dtype=torch.float64), torch.randn(C, 1, kh, kw, dtype=torch.float64)
    geometry = (stride, padding, dilation)
    grad = torch.randn(reference.depthwise_conv2d(x, w, *geometry).shape, dtype=torch.float64)
    fast, ran = with_backward_seen(lambda: run(depthwise_conv2d, x.to(dtype), w.to(dtype), grad.to(dtype), geometry))
    meant = backward if _extension.LOADED else "aten"  # without accel._C the op runs its reference
    assert ran == meant, f"the {ran} backward ran where the {meant} one was meant"
    assert_follows_rule(fast, x, w, grad, geometry)


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
    x, w = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(3, 1, 3, 3, dtype=torch.float64)
    grad = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    xf, gf = x.float(), grad.float()  # an input that does not require grad, as a network's first layer
    wf = w.float().requires_grad_()
    out = depthwise_conv2d(xf, wf, 1, 1, 1)
    (grad_w,) = torch.autograd.grad(out, [wf], gf)
    grad_x, grad_none = torch.ops.accel.depthwise_conv2d_backward(gf, xf, wf.detach(), [1, 1], [1, 1], [1, 1],
                                                                  [True, False])
    assert grad_none is None
    assert_follows_rule([out, grad_x, grad_w], x, w, grad, (1, 1, 1))


def test_non_contiguous_input_and_every_element_written(poisoned_outputs):
    x = torch.randn(2, 9, 8, 3, dtype=torch.float64).permute(0, 3, 2, 1)  # (2, 3, 8, 9), not contiguous
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    grad = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    fast = run(depthwise_conv2d, x, w, grad, (1, 1, 1))
    assert all(torch.isfinite(f).all() for f in fast)  # a NaN left in an output is an element never written
    assert_follows_rule(fast, x, w, grad, (1, 1, 1))


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
    # The replacement's output and gradients by the rule against taps() with its geometry (5x5, dilation 2,
    # padding 4: the fused backward).
    x, grad = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(2, 4, 9, 9, dtype=torch.float64)
    xa = x.float().requires_grad_()
    out = fast[0](xa)
    out.backward(grad.float())
    assert_follows_rule([out, xa.grad, fast[0].weight.grad], x, conv[0].weight.detach().double(), grad, (1, 4, 2))
    shared = accel.nn.DepthwiseConv2d.from_conv(conv[0])
    assert shared.weight is conv[0].weight  # shares, does not copy
