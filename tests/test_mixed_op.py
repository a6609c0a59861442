"""accel.ops.mixed_op against accel.reference.mixed_op: numerics, gradients, layouts, compile, errors."""
import importlib
import subprocess
import sys

import pytest
import torch

import accel
from accel.ops import mixed_op
mixed_op_module = importlib.import_module("accel.ops.mixed_op")  # the module; accel.ops.mixed_op is the function
from accel.reference import mixed_op as reference
from conftest import DEVICES, assert_by_rule

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SHAPES = [(1,), (7,), (33, 5), (2, 3, 7, 9), (1000,), (3, 33000)]  # the last spans several reduction chunks


def make_inputs(shape, K, dtype, mode, requires_grad=True, device="cpu"):
    ys = [torch.randn(shape, dtype=dtype).to(device).requires_grad_(requires_grad) for _ in range(K)]
    mix = torch.randn(K, dtype=dtype) if mode == "alpha" else torch.rand(K, dtype=dtype) + 0.1
    return ys, mix.to(device).requires_grad_(requires_grad)


def call_fast(ys, mix, mode, tau):
    return mixed_op(ys, alpha=mix, tau=tau) if mode == "alpha" else mixed_op(ys, weights=mix)


def forward_and_grads(fn, ys, mix, grad):
    out = fn(ys, mix)
    grads = torch.autograd.grad(out, [*ys, mix], grad)
    return [out, *grads]


def leaf_copies(ys, mix, dtype):
    """CPU copies in ``dtype`` for the reference."""
    return [y.detach().to("cpu", dtype).requires_grad_() for y in ys], mix.detach().to("cpu", dtype).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["alpha", "weights"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_follow_the_numerics_rule(shape, K, dtype, mode, device):
    tau = 0.7
    ys, mix = make_inputs(shape, K, dtype, mode, device=device)
    grad = torch.randn(shape, dtype=dtype, device=device)
    fast = forward_and_grads(lambda y, m: call_fast(y, m, mode, tau), ys, mix, grad)
    ref_tau = tau if mode == "alpha" else None
    y64, m64 = leaf_copies(ys, mix, torch.float64)
    ref64 = forward_and_grads(lambda y, m: reference.mixed_op(y, m, ref_tau), y64, m64, grad.cpu().double())
    yd, md = leaf_copies(ys, mix, dtype)
    ref_d = forward_and_grads(lambda y, m: reference.mixed_op(y, m, ref_tau), yd, md, grad.cpu())
    names = ["out"] + [f"grad ys[{k}]" for k in range(K)] + [f"grad {mode}"]
    for name, f, rd, r64 in zip(names, fast, ref_d, ref64):
        assert f.dtype == dtype
        assert_by_rule(f, rd, r64, name)


def test_every_output_element_is_written(poisoned_outputs):
    ys, alpha = make_inputs((5, 4099), 4, torch.float32, "alpha")
    out = mixed_op(ys, alpha=alpha, tau=1.3)
    grads = torch.autograd.grad(out, [*ys, alpha], torch.randn_like(out))
    for t in [out, *grads]:
        assert torch.isfinite(t).all()


def test_large_outputs_streamed_past_the_cache(poisoned_outputs):
    # (K + 1) * numel * 4 bytes >= 16 MiB: the kernels write with non-temporal stores (csrc/cpu/simd.h);
    # an odd numel leaves a tail that is stored normally.
    shape, K = (480007,), 8
    ys, alpha = make_inputs(shape, K, torch.float32, "alpha")
    grad = torch.randn(shape)
    fast = forward_and_grads(lambda y, m: mixed_op(y, alpha=m, tau=1.0), ys, alpha, grad)
    y64, a64 = leaf_copies(ys, alpha, torch.float64)
    ref64 = forward_and_grads(lambda y, m: reference.mixed_op(y, m, 1.0), y64, a64, grad.double())
    yd, ad = leaf_copies(ys, alpha, torch.float32)
    ref_d = forward_and_grads(lambda y, m: reference.mixed_op(y, m, 1.0), yd, ad, grad)
    for k, (f, rd, r64) in enumerate(zip(fast, ref_d, ref64)):
        assert_by_rule(f, rd, r64, f"output {k}")


@pytest.mark.parametrize("mode", ["alpha", "weights"])
def test_gradcheck_float64(mode):
    ys, mix = make_inputs((3, 5), 3, torch.float64, mode)
    fn = (lambda *a: mixed_op(list(a[:-1]), alpha=a[-1], tau=0.6)) if mode == "alpha" else (
        lambda *a: mixed_op(list(a[:-1]), weights=a[-1]))
    assert torch.autograd.gradcheck(fn, (*ys, mix))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [None, 0.8])
def test_opcheck(tau, device):
    ys, mix = make_inputs((2, 3, 5), 3, torch.float32, "alpha", device=device)
    torch.library.opcheck(torch.ops.accel.mixed_op.default, (ys, mix, tau))
    grad = torch.randn(2, 3, 5, device=device)
    ys_plain = [y.detach() for y in ys]
    torch.library.opcheck(torch.ops.accel.mixed_op_backward.default, (grad, ys_plain, mix.detach(), tau))


def test_torch_compile_fullgraph_matches_eager():
    ys, alpha = make_inputs((4, 6, 5), 5, torch.float32, "alpha")

    def edge(ys, alpha):
        return torch.relu(mixed_op(ys, alpha=alpha, tau=0.5)).sum()

    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    eager_loss = edge(ys, alpha)
    eager_grads = torch.autograd.grad(eager_loss, [*ys, alpha])
    loss = compiled(ys, alpha)
    grads = torch.autograd.grad(loss, [*ys, alpha])
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_non_contiguous_inputs_and_expanded_grad():
    transposed = [torch.randn(9, 6, dtype=torch.float64).t().requires_grad_() for _ in range(2)]
    strided = torch.randn(6, 18, dtype=torch.float64)[:, ::2].requires_grad_()
    ys = [*transposed, strided]
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss = mixed_op(ys, alpha=alpha, tau=1.0).sum()  # sum's backward hands in an expanded gradient
    grads = torch.autograd.grad(loss, [*ys, alpha])
    ref = torch.autograd.grad(reference.mixed_op(ys, alpha, 1.0).sum(), [*ys, alpha])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_channels_last_layout_is_kept():
    ys = [torch.randn(2, 5, 4, 3).to(memory_format=torch.channels_last).requires_grad_() for _ in range(4)]
    w = torch.rand(4, requires_grad=True)
    out = mixed_op(ys, weights=w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.mixed_op(ys, w))
    grads = torch.autograd.grad(out, ys, torch.randn_like(out))
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)


def test_stacked_tensor_input_equals_list_input():
    stacked = torch.randn(4, 3, 7)
    w = torch.rand(4)
    torch.testing.assert_close(mixed_op(stacked, weights=w), mixed_op(list(stacked), weights=w))


@pytest.mark.parametrize("mode", ["alpha", "weights"])
def test_zero_weight_branch_is_switched_off(mode):
    ys, _ = make_inputs((4, 33), 3, torch.float32, mode)
    ys[1] = torch.full((4, 33), float("nan"), requires_grad=True)  # never read when its weight is 0
    if mode == "alpha":
        mix = torch.tensor([0.3, float("-inf"), -0.2], requires_grad=True)
        out = mixed_op(ys, alpha=mix, tau=1.0)
        expected = reference.mixed_op([ys[0], ys[2]], mix[[0, 2]].detach(), 1.0)
    else:
        mix = torch.tensor([0.3, 0.0, 0.5], requires_grad=True)
        out = mixed_op(ys, weights=mix)
        expected = 0.3 * ys[0] + 0.5 * ys[2]
    torch.testing.assert_close(out, expected.detach())
    grads = torch.autograd.grad(out, [*ys, mix], torch.randn_like(out))
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))
    assert grads[-1][1] == 0
    assert torch.isfinite(grads[-1]).all() and grads[-1][0] != 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_tensors(dtype):
    ys, w = make_inputs((0, 5), 3, dtype, "weights")
    out = mixed_op(ys, weights=w)
    assert out.shape == (0, 5)
    grads = torch.autograd.grad(out, [*ys, w], torch.empty(0, 5, dtype=dtype))
    assert all(g.shape == (0, 5) for g in grads[:-1])
    assert torch.equal(grads[-1], torch.zeros(3, dtype=dtype))


def test_bitwise_deterministic_across_runs_and_thread_counts():
    ys, alpha = make_inputs((3, 70001), 8, torch.float32, "alpha")
    grad = torch.randn(3, 70001)

    def run():
        out = mixed_op(ys, alpha=alpha, tau=0.9)
        return [out, *torch.autograd.grad(out, [*ys, alpha], grad)]

    threads = torch.get_num_threads()
    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ys, w: mixed_op(ys, weights=w[:2]), "weights.*shape"),
        (lambda ys, w: mixed_op(ys[:2] + [torch.randn(4, 6)], weights=w), r"ys\[2\].*shape"),
        (lambda ys, w: mixed_op(ys[:2] + [ys[2].double()], weights=w), r"ys\[2\].*dtype"),
        (lambda ys, w: mixed_op([y.int() for y in ys], weights=w), r"ys\[0\].*float32"),
        (lambda ys, w: mixed_op(ys, weights=w.int()), "weights.*floating"),
        (lambda ys, w: mixed_op(ys, weights=w.to("meta")), "weights.*meta"),
        (lambda ys, w: mixed_op(ys[:2] + [ys[2].to("meta")], weights=w), r"ys\[2\].*meta"),
        (lambda ys, w: mixed_op(ys, alpha=w, tau=float("nan")), "tau"),
        (lambda ys, w: mixed_op(ys, alpha=w, tau=0.0), "tau"),
        (lambda ys, w: mixed_op(ys, weights=w, alpha=w), "exactly one"),
        (lambda ys, w: mixed_op(ys), "exactly one"),
        (lambda ys, w: mixed_op([], weights=w[:0]), "at least one"),
        (lambda ys, w: mixed_op(torch.tensor(1.0), weights=w), "leading K"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    ys = [torch.randn(4, 5) for _ in range(3)]
    w = torch.rand(3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(ys, w)


def test_cpp_kernel_checks_its_inputs_too():
    ys = [torch.randn(4, 5) for _ in range(3)]
    with pytest.raises(RuntimeError, match="weights must have shape"):
        torch.ops.accel.mixed_op(ys, torch.rand(2), None)
    with pytest.raises(RuntimeError, match="tau must be finite"):
        torch.ops.accel.mixed_op(ys, torch.rand(3), float("inf"))


@pytest.mark.parametrize("tau", [None, 0.9])
def test_reference_fallback_kernels_match_the_compiled_ones(tau):
    ys, mix = make_inputs((5, 37), 4, torch.float64, "alpha", requires_grad=False)
    grad = torch.randn(5, 37, dtype=torch.float64)
    torch.testing.assert_close(mixed_op_module._reference_forward(ys, mix, tau), torch.ops.accel.mixed_op(ys, mix, tau))
    ref_ys, ref_w = mixed_op_module._reference_backward(grad, ys, mix, tau)
    fast_ys, fast_w = torch.ops.accel.mixed_op_backward(grad, ys, mix, tau)
    for r, f in zip([*ref_ys, ref_w], [*fast_ys, fast_w]):
        torch.testing.assert_close(r, f)


@pytest.mark.skipif(not accel._extension.LOADED, reason="needs the compiled extension to compare against")
def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['accel._C'] = None\n"  # makes `from accel import _C` fail
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import accel\n"
        "msgs = [str(x.message) for x in w if 'accel._C' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'pip install' in msgs[0], msgs\n"
        "ys = [torch.ones(3), 2 * torch.ones(3)]\n"
        "out = accel.ops.mixed_op(ys, weights=torch.tensor([0.5, 0.25]))\n"
        "assert torch.equal(out, torch.ones(3)), out\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
