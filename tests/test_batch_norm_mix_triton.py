"""The Triton kernels of batch_norm_mix (kernels/batch_norm_mix.py), run on CPU tensors under
TRITON_INTERPRET=1, judged by the numerics rule against eager BatchNorm modules (affine=False), the reference of
tests/test_batch_norm_mix.py, run in float64 and in the kernels' dtype on the same rounded inputs."""
import pytest
import torch
from torch import nn

from conftest import assert_by_rule, interpreted_kernels

kernels = interpreted_kernels("batch_norm_mix")

NAMES = ["out", "stats", "running"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def running_stats(K, C, dtype=torch.float64):
    return torch.stack([torch.stack([torch.randn(C), torch.rand(C) + 0.5]) for _ in range(K)]).to(dtype)


def reference(zs, w, running, grad, training, momentum, eps):
    """[out, stats (K, 2, C): mean and 1/sqrt(var + eps) normalised with, updated running statistics, *grad_zs,
    grad_w] of sum_k w_k BN_k(z_k) by eager BatchNorm modules, in the inputs' dtype."""
    zs = [z.detach().clone().requires_grad_() for z in zs]
    w = w.detach().clone().requires_grad_()
    dims = [0] + list(range(2, zs[0].dim()))
    kind = nn.BatchNorm2d if zs[0].dim() == 4 else nn.BatchNorm1d
    out, stats, new_running = 0, [], []
    for k, z in enumerate(zs):
        bn = kind(z.shape[1], affine=False, momentum=momentum, eps=eps).to(z.dtype).train(training)
        bn.running_mean.copy_(running[k, 0])
        bn.running_var.copy_(running[k, 1])
        out = out + w[k] * bn(z)
        mean, var = (z.mean(dims), z.var(dims, unbiased=False)) if training else (running[k, 0], running[k, 1])
        stats.append(torch.stack([mean, torch.rsqrt(var + eps)]).detach())
        new_running.append(torch.stack([bn.running_mean, bn.running_var]))
    *grad_zs, grad_w = torch.autograd.grad(out, [*zs, w], grad)
    return [out.detach(), torch.stack(stats), torch.stack(new_running), *grad_zs, grad_w]


def run_and_judge(zs, w, running, grad, training, momentum=0.1, eps=1e-5):
    """Runs both kernels on the inputs as given (their dtype, any layout) and judges every output and gradient by
    the rule against the reference in float64 and in that dtype, on the same values."""
    out, stats, new_running = kernels.forward(zs, w, running, training, momentum, eps)
    grad_zs, grad_w = kernels.backward(grad, zs, w, stats, training, eps)
    fast = [out, stats, new_running, *grad_zs, grad_w]
    in_dtype = reference(zs, w, running, grad, training, momentum, eps)
    ref64 = reference([z.double() for z in zs], w.double(), running.double(), grad.double(), training, momentum, eps)
    names = NAMES + [f"grad zs[{k}]" for k in range(len(zs))] + ["grad w"]
    for name, f, r, r64 in zip(names, fast, in_dtype, ref64, strict=True):
        assert f.dtype == zs[0].dtype, name
        assert_by_rule(f, r, r64, f"{name} {f.dtype} training={training}")
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("K, shape", [(3, (2, 3, 5, 7)), (1, (3, 2, 33, 33)), (2, (4, 5, 6))])
def test_outputs_and_gradients_follow_the_numerics_rule(K, shape, training, dtype):
    # channel means far from 0 next to their spread: one-pass variances would cancel
    zs = [(torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype) for _ in range(K)]
    w = (torch.rand(K, dtype=torch.float64) + 0.1).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    run_and_judge(zs, w, running_stats(K, shape[1], dtype), grad, training)


def test_every_output_element_is_written_and_deterministic(poisoned_outputs):
    zs = [torch.randn(3, 4, 40, 30) for _ in range(2)]  # planes of 1200 values: two blocks, one partial
    w, running, grad = torch.rand(2), running_stats(2, 4, torch.float32), torch.randn(3, 4, 40, 30)
    first = run_and_judge(zs, w, running, grad, True)
    out, stats, _ = kernels.forward(zs, w, running, True, 0.1, 1e-5)
    grad_zs, grad_w = kernels.backward(grad, zs, w, stats, True, 1e-5)
    for a, b in zip([first[0], *first[3:]], [out, *grad_zs, grad_w], strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_inputs(training):
    zs = [torch.randn(3, 4, 5, 6).transpose(2, 3), torch.randn(3, 4, 6, 5).to(memory_format=torch.channels_last)]
    grad = torch.randn(3, 4, 5, 6).transpose(2, 3)
    run_and_judge(zs, torch.rand(2) + 0.1, running_stats(2, 4, torch.float32), grad, training)


def test_training_on_one_value_per_channel_raises():
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernels.forward([torch.randn(1, 2, 1, 1)], torch.ones(1), running_stats(1, 2, torch.float32), True, 0.1, 1e-5)
