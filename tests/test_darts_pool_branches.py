"""accel.ops.darts_pool_branches against DARTS' eager pool + BatchNorm branches (accel.reference.darts)."""
import copy

import pytest
import torch
from torch import nn

from accel.ops import darts_pool_branches
from conftest import assert_by_rule


def branches(C):
    """DARTS' two stride-1 pooling branches, as search_ops builds them."""
    return (nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.BatchNorm2d(C, affine=False)),
            nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.BatchNorm2d(C, affine=False)))


def randomize_running_stats(*bns):
    for bn in bns:
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)


def eager(x, w, max_branch, avg_branch):
    return w[0] * max_branch(x) + w[1] * avg_branch(x)


def run(fn, x, w, grad):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(x, w)
    return [out, *torch.autograd.grad(out, [x, w], grad)]


# shift: channel means far from 0 next to their spread, where the variance E[x^2] - mean^2 and an uncentred
# output cancel
@pytest.mark.parametrize("shift", [0.0, 30.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 5, 7, 9), (1, 2, 1, 3), (4, 1, 2, 33)])
def test_matches_eager_darts_by_the_numerics_rule(shape, training, shift):
    C = shape[1]
    max_b, avg_b = branches(C)
    randomize_running_stats(max_b[1], avg_b[1])
    fast_bns = copy.deepcopy((max_b[1], avg_b[1]))
    twins32 = copy.deepcopy((max_b, avg_b))
    twins64 = tuple(copy.deepcopy(b).double() for b in (max_b, avg_b))
    for module in (*fast_bns, *twins32, *twins64):
        module.train(training)
    x, w, grad = torch.randn(shape) + shift, torch.rand(2) + 0.1, torch.randn(shape)
    fast = run(lambda x, w: darts_pool_branches(x, w, *fast_bns), x, w, grad)
    ref32 = run(lambda x, w: eager(x, w, *twins32), x, w, grad)
    ref64 = run(lambda x, w: eager(x, w, *twins64), x.double(), w.double(), grad.double())
    for name, f, r32, r64 in zip(["out", "grad x", "grad weights"], fast, ref32, ref64):
        assert_by_rule(f, r32, r64, name)
    for fast_bn, bn32, bn64 in zip(fast_bns, (twins32[0][1], twins32[1][1]), (twins64[0][1], twins64[1][1])):
        assert_by_rule(fast_bn.running_mean, bn32.running_mean, bn64.running_mean, "running_mean")
        assert_by_rule(fast_bn.running_var, bn32.running_var, bn64.running_var, "running_var")
        assert fast_bn.num_batches_tracked == bn32.num_batches_tracked


def test_max_pool_ties_route_the_gradient_like_pytorch():
    x = torch.zeros(2, 2, 5, 5)
    x[:, :, 2, 2] = 1.0  # every window is a tie of zeros except those around the centre
    w = torch.tensor([1.0, 0.0])
    fast_bns = branches(2)
    twins = copy.deepcopy(fast_bns)
    grad = torch.randn(2, 2, 5, 5)
    fast = run(lambda x, w: darts_pool_branches(x, w, fast_bns[0][1], fast_bns[1][1]), x, w, grad)
    ref = run(lambda x, w: eager(x, w, *twins), x, w, grad)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_every_element_written_and_deterministic(poisoned_outputs):
    max_b, avg_b = branches(3)
    x, w, grad = torch.randn(4, 3, 9, 9), torch.rand(2), torch.randn(4, 3, 9, 9)
    first = run(lambda x, w: darts_pool_branches(x, w, max_b[1], avg_b[1]), x, w, grad)
    second = run(lambda x, w: darts_pool_branches(x, w, max_b[1], avg_b[1]), x, w, grad)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_training_on_one_value_per_channel_raises_like_batchnorm():
    max_b, avg_b = branches(2)
    with pytest.raises(ValueError, match="more than one value per channel"):
        darts_pool_branches(torch.randn(1, 2, 1, 1), torch.rand(2), max_b[1], avg_b[1])


def test_opcheck():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    w = torch.rand(2, requires_grad=True)
    running = torch.stack([torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)])
    for training in (True, False):
        torch.library.opcheck(torch.ops.accel.darts_pool_branches.default, (x, w, running, training, 0.1, 1e-5))
    out, stats, _ = torch.ops.accel.darts_pool_branches(x.detach(), w.detach(), running, True, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.accel.darts_pool_branches_backward.default,
                          (torch.randn_like(out), x.detach(), w.detach(), stats, True, 1e-5))


def test_torch_compile_fullgraph():
    max_b, avg_b = branches(3)
    twins = copy.deepcopy((max_b, avg_b))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.rand(2, requires_grad=True)
    compiled = torch.compile(lambda x, w: darts_pool_branches(x, w, max_b[1], avg_b[1]).square().sum(),
                             fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w), [x, w])
    want = torch.autograd.grad(eager(x, w, *twins).square().sum(), [x, w])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(max_b[1].running_mean, twins[0][1].running_mean)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w, b: darts_pool_branches(x[0], w, *b), "float32 \\(N, C, H, W\\)"),
        (lambda x, w, b: darts_pool_branches(x.double(), w, *b), "float32"),
        (lambda x, w, b: darts_pool_branches(x, w[:1], *b), "shape \\(2,\\)"),
        (lambda x, w, b: darts_pool_branches(x, w, nn.BatchNorm2d(3), b[1]), "affine=False"),
        (lambda x, w, b: darts_pool_branches(x, w, nn.BatchNorm2d(4, affine=False), b[1]), "BatchNorm2d\\(3"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    max_b, avg_b = branches(3)
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 3, 8, 8), torch.rand(2), (max_b[1], avg_b[1]))
