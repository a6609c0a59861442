"""The Triton kernels of batch_norm_mix (kernels/batch_norm_mix.py), run on CPU tensors under
TRITON_INTERPRET=1, against the C++ kernel's op (the reference fallback where the extension is missing)."""
import pytest
import torch

from conftest import interpreted_kernels

kernels = interpreted_kernels("batch_norm_mix")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def running_stats(K, C, dtype):
    return torch.stack([torch.stack([torch.randn(C), torch.rand(C) + 0.5]) for _ in range(K)]).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("K, shape", [(3, (2, 3, 5, 7)), (1, (3, 2, 33, 33)), (2, (4, 5, 6))])
def test_matches_the_op_in_float64(K, shape, training, dtype, tol):
    zs = [(torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype) for _ in range(K)]
    w = torch.rand(K, dtype=dtype) + 0.1
    running = running_stats(K, shape[1], dtype)
    grad = torch.randn(shape, dtype=dtype)
    out, stats, new_running = kernels.forward(zs, w, running, training, 0.1, 1e-5)
    grad_zs, grad_w = kernels.backward(grad, zs, w, stats, training, 1e-5)
    want = torch.ops.accel.batch_norm_mix([z.double() for z in zs], w.double(), running.double(), training, 0.1, 1e-5)
    want_grads = torch.ops.accel.batch_norm_mix_backward(grad.double(), [z.double() for z in zs], w.double(),
                                                         want[1], training, 1e-5)
    for name, got, expected in [("out", out, want[0]), ("stats", stats, want[1]), ("running", new_running, want[2]),
                                ("grad w", grad_w, want_grads[1]),
                                *[(f"grad zs[{k}]", g, e) for k, (g, e) in enumerate(zip(grad_zs, want_grads[0]))]]:
        assert got.dtype == dtype and got.shape == expected.shape, name
        scale = expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= tol * max(scale, 1.0), name


def test_every_output_element_is_written_and_deterministic(poisoned_outputs):
    zs = [torch.randn(3, 4, 40, 30) for _ in range(2)]  # planes of 1200 values: two blocks, one partial
    w, running, grad = torch.rand(2), running_stats(2, 4, torch.float32), torch.randn(3, 4, 40, 30)
    runs = []
    for _ in range(2):
        out, stats, _ = kernels.forward(zs, w, running, True, 0.1, 1e-5)
        grad_zs, grad_w = kernels.backward(grad, zs, w, stats, True, 1e-5)
        runs.append([out, *grad_zs, grad_w])
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_non_contiguous_inputs_and_training_on_one_value():
    z = torch.randn(3, 4, 6, 5)
    zs = [z.transpose(2, 3), z.to(memory_format=torch.channels_last)]
    running = running_stats(2, 4, torch.float32)
    out, _, _ = kernels.forward(zs, torch.ones(2), running, True, 0.1, 1e-5)
    want, _, _ = kernels.forward([zs[0].contiguous(), z], torch.ones(2), running, True, 0.1, 1e-5)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernels.forward([torch.randn(1, 2, 1, 1)], torch.ones(1), running_stats(1, 2, torch.float32), True, 0.1, 1e-5)
