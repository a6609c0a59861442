"""accel.nn.LSSL in float32 against the same system run as the reference recurrence (accel.reference.lssl), in
float32 and on a float64 copy, by the numerics rule on the output and the gradients to the input and every
parameter; the recurrent mode, causality and the bidirectional kernel, gradcheck, state_dict and compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

from accel.nn import LSSL
from accel.numerics import farthest, judge
from accel.reference import lssl as reference
from conftest import assert_by_rule, outputs_and_gradients, perturbed_copy

F32, F64 = torch.float32, torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def eager_forward(layer: LSSL, u: torch.Tensor) -> torch.Tensor:
    """The layer's output through the reference's step-by-step recurrence, with the layer's parameters."""
    dA, dB = reference.discretize(layer.A, layer.B, layer.log_dt.exp(), layer.discretization, layer.alpha)
    y, _ = reference.recurrence(u, dA, dB, layer.C, layer.D)
    return layer.output_linear(F.gelu(y).flatten(2))


def bidirectional_forward(layer: LSSL, u: torch.Tensor) -> torch.Tensor:
    """A bidirectional layer's output through the reference: the kernels of both directions by their definition
    (krylov_naive), the reference's convolution, the output map."""
    dA, dB = reference.discretize(layer.A, layer.B, layer.log_dt.exp(), layer.discretization, layer.alpha)
    M = layer.channels
    K = reference.krylov_naive(dA, dB, layer.C[:, :M], u.shape[1])
    K_reverse = reference.krylov_naive(dA, dB, layer.C[:, M:], u.shape[1])
    y = reference.causal_conv(u, K, layer.D, "gelu", K_reverse)
    return layer.output_linear(y.flatten(2))


PERTURBATIONS = 3


def verdicts(layer, fast, slow, u, seed=0, perturbations=PERTURBATIONS):
    """fast(layer, u) in float32 against slow(layer, u) by the numerics rule, output and gradients: {name: (fast's,
    the yardstick of the reference's float32 error, the float64 reference, Verdict)}. The yardstick is the worst
    of: slow in float32; slow in float64 rounded; slow in float64 on values moved by half an ulp (``perturbations``
    draws), rounded. One float32 run is one draw of the reference's error, and log dt's gradient is 5 numbers:
    against slow in float32 alone it failed the rule in 3 of 400 draws (by up to 31x), with one perturbation in 1
    of 600, with three in none of 600 (100 draws of each test below)."""
    layer64 = copy.deepcopy(layer).double()
    got, ref64 = outputs_and_gradients(fast, layer, [u], seed), outputs_and_gradients(slow, layer64, [u.double()], seed)
    gen = torch.Generator().manual_seed(seed + 1)
    candidates = [outputs_and_gradients(slow, layer, [u], seed), {k: v.float() for k, v in ref64.items()}]
    for _ in range(perturbations):
        candidates.append({k: v.float() for k, v in outputs_and_gradients(slow, *perturbed_copy(layer64, [u.double()], gen), seed).items()})
    result = {}
    for name, r64 in ref64.items():
        worst = farthest([c[name] for c in candidates], r64)
        assert got[name].dtype == F32, name
        result[name] = (got[name], worst, r64, judge(got[name], worst, r64))
    return result


def assert_layer_by_rule(layer, fast, slow, u, what=""):
    checked = verdicts(layer, fast, slow, u)
    assert {f"grad of {n}" for n, p in layer.named_parameters() if p.requires_grad} < checked.keys()
    for name, (got, worst, r64, _) in checked.items():
        assert r64.abs().max() > 0, f"{what} {name}: the reference is 0, nothing is checked"
        assert_by_rule(got, worst, r64, f"{what} {name}")


@pytest.mark.parametrize("measure", reference.MEASURES)
def test_matches_the_recurrence_with_gradients_to_every_parameter(measure):
    # the Krylov kernel, FFT convolution and output map against the recurrence, by the rule's factor 2 (over 100
    # draws per measure, fast error / the yardstick's, where above the floor: median 0.95-1.11, max 3.0, all within
    # 2x + floor)
    layer = LSSL(5, 8, channels=2, measure=measure)
    assert_layer_by_rule(layer, lambda m, u: m(u), eager_forward, torch.randn(2, 30, 5), measure)


def test_recurrent_mode_agrees_with_the_recurrence():
    layer = LSSL(4, 6, channels=2).eval()

    def stepped(layer, u):
        state = layer.default_state(u.shape[0])
        steps = []
        for t in range(u.shape[1]):
            y_t, state = layer.step(u[:, t], state)
            steps.append(y_t)
        return torch.stack(steps, 1)

    assert_layer_by_rule(layer, stepped, eager_forward, torch.randn(3, 25, 4), "step")


def test_causal_and_bidirectional():
    u = torch.randn(1, 20, 3)
    later = u.clone()
    later[:, 15:] += 1.0
    causal = LSSL(3, 4)
    assert torch.equal(causal(u)[:, :15], causal(later)[:, :15])  # the past does not see the future
    both = LSSL(3, 4, channels=2, bidirectional=True)
    assert both.C.shape == (3, 4, 4)  # (H, 2 M, N): a C per direction
    assert_layer_by_rule(both, lambda m, u: m(u), bidirectional_forward, torch.randn(2, 20, 3), "bidirectional")
    assert not torch.allclose(both(u)[:, :15], both(later)[:, :15])  # the earlier outputs see the future
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
    assert torch.equal(clone(x), fixed(x))


def test_torch_compile_fullgraph():
    layer = LSSL(3, 4, channels=2)
    u = torch.randn(2, 16, 3, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(u).square().sum(), [u, layer.C, layer.log_dt])
    want = torch.autograd.grad(layer(u).square().sum(), [u, layer.C, layer.log_dt])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)  # the same ATen ops under aot_eager: bitwise equal here


def test_bad_arguments():
    with pytest.raises(ValueError, match="measure"):
        LSSL(2, 3, measure="chebyshev")
    with pytest.raises(ValueError, match="discretization"):
        LSSL(2, 3, discretization="euler")
    with pytest.raises(ValueError, match="dt_min"):
        LSSL(2, 3, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="\\(B, L, 2\\)"):
        LSSL(2, 3)(torch.randn(4, 2))
