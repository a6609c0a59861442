"""accel.nn.LSSL against the same system run as the reference recurrence (accel.reference.lssl)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from accel.nn import LSSL
from accel.numerics import scaled_error
from accel.reference import lssl as reference


def eager_forward(layer: LSSL, u: torch.Tensor) -> torch.Tensor:
    """The layer's output through the reference's step-by-step recurrence, with the layer's parameters."""
    dA, dB = reference.discretize(layer.A, layer.B, layer.log_dt.exp(), layer.discretization, layer.alpha)
    y, _ = reference.recurrence(u, dA, dB, layer.C, layer.D)
    return layer.output_linear(F.gelu(y).flatten(2))


@pytest.mark.parametrize("measure", reference.MEASURES)
def test_matches_the_recurrence_with_gradients_to_every_parameter(measure):
    layer = LSSL(5, 8, channels=2, measure=measure)
    layer64 = copy.deepcopy(layer).double()
    u = torch.randn(2, 30, 5)
    grad = torch.randn(2, 30, 5)
    results = []
    for net, fn, x in ((layer, lambda m, x: m(x), u), (layer, eager_forward, u), (layer64, eager_forward, u.double())):
        net.zero_grad()
        y = fn(net, x)
        y.backward(grad.to(y.dtype))
        results.append([y] + [p.grad.clone() for p in net.parameters()])
    names = ["y"] + [n for n, _ in layer.named_parameters()]
    for name, f, r32, r64 in zip(names, *results):
        assert torch.isfinite(f).all() and f.abs().sum() > 0, name
        # A whole layer: Krylov kernel, FFT convolution and output map compose their float32 roundings; each
        # op is held to the numerics rule on its own (test_krylov_kernel, test_causal_conv).
        assert scaled_error(f, r64) <= 4 * scaled_error(r32, r64) + 1e-5, name


def test_recurrent_mode_agrees_with_the_convolution():
    layer = LSSL(4, 6, channels=2).eval()
    u = torch.randn(3, 25, 4)
    state = layer.default_state(3)
    steps = []
    for t in range(u.shape[1]):
        y_t, state = layer.step(u[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), layer(u), rtol=1e-4, atol=1e-5)


def test_causal_and_bidirectional():
    u = torch.randn(1, 20, 3)
    later = u.clone()
    later[:, 15:] += 1.0
    causal = LSSL(3, 4)
    torch.testing.assert_close(causal(u)[:, :15], causal(later)[:, :15])  # the past does not see the future
    both = LSSL(3, 4, bidirectional=True)
    assert not torch.allclose(both(u)[:, :15], both(later)[:, :15])
    assert both.C.shape == (3, 2, 4)
    with pytest.raises(RuntimeError, match="no recurrent mode"):
        both.step(u[:, 0], both.default_state(1))


def test_gradcheck_zoh_float64_and_module_behaviour():
    layer = LSSL(2, 3, discretization="zoh", measure="legt").double()
    u = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, *p: torch.func.functional_call(
        layer, dict(zip([n for n, _ in layer.named_parameters()], p)), (u,)), (u, *layer.parameters()))
    fixed = LSSL(2, 3, learn_dt=False)
    assert "log_dt" in dict(fixed.named_buffers()) and "log_dt" in fixed.state_dict()
    clone = LSSL(2, 3, learn_dt=False)
    clone.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 9, 2)
    torch.testing.assert_close(clone(x), fixed(x))


def test_torch_compile_fullgraph():
    layer = LSSL(3, 4, channels=2)
    u = torch.randn(2, 16, 3, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(u).square().sum(), [u, layer.C, layer.log_dt])
    want = torch.autograd.grad(layer(u).square().sum(), [u, layer.C, layer.log_dt])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="measure"):
        LSSL(2, 3, measure="chebyshev")
    with pytest.raises(ValueError, match="discretization"):
        LSSL(2, 3, discretization="euler")
    with pytest.raises(ValueError, match="dt_min"):
        LSSL(2, 3, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="\\(B, L, 2\\)"):
        LSSL(2, 3)(torch.randn(4, 2))
