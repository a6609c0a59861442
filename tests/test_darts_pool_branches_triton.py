"""The Triton kernels of darts_pool_branches (kernels/darts_pool_branches.py), run on CPU tensors under
TRITON_INTERPRET=1, judged by the numerics rule against DARTS' eager branches (max and average pools, each followed
by BatchNorm2d(affine=False): the reference of tests/test_darts_pool_branches.py), run in float64 and in float32 on
the same rounded inputs."""
import pytest
import torch
from torch import nn

from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("darts_pool_branches")

NAMES = ["out", "stats", "running", "grad x", "grad weights"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def running_stats(C):
    return torch.stack([torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5])


def reference(x, w, running, grad, training, momentum, eps):
    """[out, stats (4, C): mean and 1/sqrt(var + eps) of the max then the avg branch, updated running statistics
    (4, C), grad x, grad weights] of w0 BN(max_pool(x)) + w1 BN(avg_pool(x)) by eager modules, in x's dtype."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    pools = [nn.MaxPool2d(3, stride=1, padding=1), nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)]
    out, stats, new_running = 0, [], []
    for j, pool in enumerate(pools):
        bn = nn.BatchNorm2d(x.shape[1], affine=False, momentum=momentum, eps=eps).to(x.dtype).train(training)
        bn.running_mean.copy_(running[2 * j])
        bn.running_var.copy_(running[2 * j + 1])
        pooled = pool(x)
        out = out + w[j] * bn(pooled)
        if training:
            mean, var = pooled.mean((0, 2, 3)), pooled.var((0, 2, 3), unbiased=False)
        else:
            mean, var = running[2 * j], running[2 * j + 1]
        stats += [mean.detach(), torch.rsqrt(var + eps).detach()]
        new_running += [bn.running_mean, bn.running_var]
    grad_x, grad_w = torch.autograd.grad(out, [x, w], grad)
    return [out.detach(), torch.stack(stats), torch.stack(new_running), grad_x, grad_w]


def run(x, w, running, grad, training, momentum=0.1, eps=1e-5):
    """The kernels' [out, stats, running, grad x, grad weights]."""
    out, stats, new_running = kernels.forward(x, w, running, training, momentum, eps)
    return [out, stats, new_running, *kernels.backward(grad, x, w, stats, training, eps)]


def judge(fast, x, w, running, grad, training, momentum=0.1, eps=1e-5):
    in_dtype = reference(x, w, running, grad, training, momentum, eps)
    ref64 = reference(x.double(), w.double(), running.double(), grad.double(), training, momentum, eps)
    for name, f, r, r64 in zip(NAMES, fast, in_dtype, ref64, strict=True):
        assert f.dtype == torch.float32, name
        assert_by_rule(f, r, r64, f"{name} training={training}")


# shift: channel means far from 0 next to their spread, where the variance E[x^2] - mean^2 and an uncentred
# output cancel
@pytest.mark.parametrize("shift", [0.0, 30.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 7, 9), (1, 2, 1, 3), (2, 1, 30, 31)])
def test_outputs_and_gradients_follow_the_numerics_rule(shape, training, shift):
    x, w, grad, running = torch.randn(shape) + shift, torch.rand(2) + 0.1, torch.randn(shape), running_stats(shape[1])
    judge(run(x, w, running, grad, training), x, w, running, grad, training)


@pytest.mark.parametrize("training", [True, False])
def test_max_pool_ties_route_the_gradient_to_the_first_maximum(training):
    x = torch.zeros(2, 2, 5, 5)
    x[:, :, 2, 2] = 1.0  # every window is a tie of zeros except those around the centre
    w, grad, running = torch.tensor([1.0, 0.0]), torch.randn(2, 2, 5, 5), running_stats(2)
    judge(run(x, w, running, grad, training), x, w, running, grad, training)


def test_non_contiguous_inputs():
    x = torch.randn(2, 3, 9, 7).transpose(2, 3)
    grad = torch.randn(2, 3, 7, 9).to(memory_format=torch.channels_last)
    w, running = torch.rand(2) + 0.1, running_stats(3)
    judge(run(x, w, running, grad, True), x, w, running, grad, True)


def test_every_output_element_is_written_and_deterministic(poisoned_outputs):
    x, grad = torch.randn(2, 3, 25, 23), torch.randn(2, 3, 25, 23)  # 575 pixels: two blocks, one partial
    w, running = torch.tensor([0.3, 0.7]), running_stats(3)
    first, second = run(x, w, running, grad, True), run(x, w, running, grad, True)
    for a, b in zip(first, second, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    judge(first, x, w, running, grad, True)
