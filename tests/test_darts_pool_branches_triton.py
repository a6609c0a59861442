"""The Triton kernels of darts_pool_branches (kernels/darts_pool_branches.py), run on CPU tensors under
TRITON_INTERPRET=1, against the op on the CPU (C++ kernel, or the reference where the extension is missing)."""
import pytest
import torch

from conftest import interpreted_kernels

kernels = interpreted_kernels("darts_pool_branches")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def running_stats(C):
    return torch.stack([torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5])


def both(x, w, running, training, grad):
    """(kernels' results, the CPU op's results): out, stats, running, dx, grad weights."""
    results = []
    for forward, backward in ((kernels.forward, kernels.backward),
                              (torch.ops.accel.darts_pool_branches, torch.ops.accel.darts_pool_branches_backward)):
        out, stats, new_running = forward(x, w, running, training, 0.1, 1e-5)
        results.append([out, stats, new_running, *backward(grad, x, w, stats, training, 1e-5)])
    return results


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 7, 9), (1, 2, 1, 3), (2, 1, 30, 31)])
def test_matches_the_cpu_op(shape, training):
    x, w, grad = torch.randn(shape), torch.rand(2) + 0.1, torch.randn(shape)
    got, want = both(x, w, running_stats(shape[1]), training, grad)
    for name, g, e in zip(["out", "stats", "running", "dx", "grad weights"], got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=name)


def test_max_pool_ties_route_the_gradient_to_the_first_maximum():
    x = torch.zeros(2, 2, 5, 5)
    x[:, :, 2, 2] = 1.0  # every window is a tie of zeros except those around the centre
    got, want = both(x, torch.tensor([1.0, 0.0]), running_stats(2), True, torch.randn(2, 2, 5, 5))
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5)


def test_every_output_element_is_written_and_deterministic(poisoned_outputs):
    x, grad = torch.randn(2, 3, 25, 23), torch.randn(2, 3, 25, 23)  # 575 pixels: two blocks, one partial
    w, running = torch.tensor([0.3, 0.7]), running_stats(3)
    first, _ = both(x, w, running, True, grad)
    second, _ = both(x, w, running, True, grad)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)
