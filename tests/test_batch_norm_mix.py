"""accel.ops.batch_norm_mix against the eager sum of BatchNorm2d(affine=False) modules."""
import copy

import pytest
import torch
from torch import nn

from accel.ops import batch_norm_mix
from conftest import assert_by_rule


def norms(K, C, training, randomize=True, dims=4):
    kind = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    bns = [kind(C, affine=False) for _ in range(K)]
    for bn in bns:
        if randomize:
            bn.running_mean.copy_(torch.randn(C))
            bn.running_var.copy_(torch.rand(C) + 0.5)
        bn.train(training)
    return bns


def eager(zs, w, bns):
    return sum(w[k] * bn(z) for k, (z, bn) in enumerate(zip(zs, bns)))


def run(fn, zs, w, grad):
    zs = [z.detach().clone().requires_grad_() for z in zs]
    w = w.detach().clone().requires_grad_()
    out = fn(zs, w)
    return [out, *torch.autograd.grad(out, [*zs, w], grad)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("K, shape", [(4, (2, 3, 8, 8)), (1, (3, 5, 7, 9)), (3, (1, 2, 1, 3)), (2, (4, 1, 2, 33)),
                                      (5, (7, 6, 5))])
def test_matches_eager_batchnorms_by_the_numerics_rule(K, shape, training):
    bns = norms(K, shape[1], training, dims=len(shape))
    fast_bns, bns64 = copy.deepcopy(bns), [copy.deepcopy(bn).double() for bn in bns]
    # Channel means far from 0 next to small spreads: one-pass variances would cancel badly.
    zs = [3.0 * torch.randn(shape) + 20.0 for _ in range(K)]
    w, grad = torch.rand(K) + 0.1, torch.randn(shape)
    fast = run(lambda zs, w: batch_norm_mix(zs, w, fast_bns), zs, w, grad)
    ref32 = run(lambda zs, w: eager(zs, w, bns), zs, w, grad)
    ref64 = run(lambda zs, w: eager(zs, w, bns64), [z.double() for z in zs], w.double(), grad.double())
    names = ["out"] + [f"grad zs[{k}]" for k in range(K)] + ["grad weights"]
    for name, f, r32, r64 in zip(names, fast, ref32, ref64):
        assert_by_rule(f, r32, r64, name)
    for fast_bn, bn32, bn64 in zip(fast_bns, bns, bns64):
        assert_by_rule(fast_bn.running_mean, bn32.running_mean, bn64.running_mean, "running_mean")
        assert_by_rule(fast_bn.running_var, bn32.running_var, bn64.running_var, "running_var")
        assert fast_bn.num_batches_tracked == bn32.num_batches_tracked


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(training):
    K, shape = 3, (3, 2, 3, 4)
    bns = [bn.double() for bn in norms(K, shape[1], training)]
    zs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    w = torch.rand(K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *zs: batch_norm_mix(zs, w, bns), (w, *zs))


def test_every_element_written_and_deterministic(poisoned_outputs):
    bns = norms(3, 5, True)
    zs, w, grad = [torch.randn(4, 5, 9, 9) for _ in range(3)], torch.rand(3), torch.randn(4, 5, 9, 9)
    first = run(lambda zs, w: batch_norm_mix(zs, w, bns), zs, w, grad)
    second = run(lambda zs, w: batch_norm_mix(zs, w, bns), zs, w, grad)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_non_contiguous_and_channels_last_inputs():
    bns = norms(2, 4, True, randomize=False)
    twins = copy.deepcopy(bns)
    zs = [torch.randn(3, 4, 6, 5).to(memory_format=torch.channels_last), torch.randn(3, 4, 5, 6).transpose(2, 3)]
    w, grad = torch.rand(2), torch.randn(3, 4, 6, 5)
    for f, e in zip(run(lambda zs, w: batch_norm_mix(zs, w, bns), zs, w, grad),
                    run(lambda zs, w: eager(zs, w, twins), zs, w, grad)):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_opcheck():
    zs = [torch.randn(2, 3, 6, 7, requires_grad=True) for _ in range(2)]
    w = torch.rand(2, requires_grad=True)
    running = torch.stack([torch.stack([torch.zeros(3), torch.ones(3)])] * 2)
    for training in (True, False):
        torch.library.opcheck(torch.ops.accel.batch_norm_mix.default, (zs, w, running, training, 0.1, 1e-5))
    out, stats, _ = torch.ops.accel.batch_norm_mix([z.detach() for z in zs], w.detach(), running, True, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.accel.batch_norm_mix_backward.default,
                          (torch.randn_like(out), [z.detach() for z in zs], w.detach(), stats, True, 1e-5))


def test_torch_compile_fullgraph():
    bns = norms(2, 3, True)
    twins = copy.deepcopy(bns)
    zs = [torch.randn(2, 3, 8, 8, requires_grad=True) for _ in range(2)]
    w = torch.rand(2, requires_grad=True)
    compiled = torch.compile(lambda zs, w: batch_norm_mix(zs, w, bns).square().sum(), fullgraph=True,
                             backend="aot_eager")
    got = torch.autograd.grad(compiled(zs, w), [*zs, w])
    want = torch.autograd.grad(eager(zs, w, twins).square().sum(), [*zs, w])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bns[1].running_var, twins[1].running_var)


def test_training_on_one_value_per_channel_raises_like_batchnorm():
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm_mix([torch.randn(1, 2, 1, 1)], torch.rand(1), norms(1, 2, True))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda zs, w, b: batch_norm_mix([], w, b), "at least one"),
        (lambda zs, w, b: batch_norm_mix([zs[0].half(), zs[1]], w, b), "float32 or float64"),
        (lambda zs, w, b: batch_norm_mix([zs[0], zs[1][:, :, :4]], w, b), "zs\\[1\\]"),
        (lambda zs, w, b: batch_norm_mix([zs[0][0, 0, 0]] * 2, w, b), "\\(N, C, ...\\)"),
        (lambda zs, w, b: batch_norm_mix(zs, w[:1], b), "shape \\(2,\\)"),
        (lambda zs, w, b: batch_norm_mix(zs, w, b[:1]), "one BatchNorm per tensor"),
        (lambda zs, w, b: batch_norm_mix(zs, w, [nn.BatchNorm2d(3), b[1]]), "affine=False"),
        (lambda zs, w, b: batch_norm_mix(zs, w, [nn.BatchNorm2d(4, affine=False), b[1]]), "BatchNorm\\(3"),
        (lambda zs, w, b: batch_norm_mix(zs, w, [b[0], b[1].eval()]), "share training mode"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call([torch.randn(2, 3, 8, 8) for _ in range(2)], torch.rand(2), norms(2, 3, True))
