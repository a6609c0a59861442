"""accel.nn.Hopfield, HopfieldPooling and HopfieldLayer: the module in float32 against the reference update
(accel.reference.hopfield) run on the module's own projections, in float32 and on a float64 copy, by the numerics
rule on the output and the gradients to the inputs and every parameter; masks, batch_first, state_dict, dtype,
train/eval with dropout, learnable scaling and torch.compile(fullgraph=True)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from accel.nn import Hopfield, HopfieldLayer, HopfieldPooling
from accel.numerics import farthest, judge
from accel.reference import hopfield as reference
from conftest import assert_by_rule, outputs_and_gradients, perturbed_copy

F32, F64 = torch.float32, torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def by_hand(m: Hopfield, stored, state, projection, padding=None, mask=None, keep=None, association=False):
    """The module's forward with the reference loop in place of the op; ``keep``: a dropout mask (already scaled
    by 1 / (1 - p)) applied to the final association; ``association``: return that association instead."""
    heads = lambda x, w: x.unflatten(-1, (m.num_heads, w)).transpose(1, 2)  # noqa: E731
    q = heads(m.q_proj(m.norm_state_pattern(state)), m.hidden_size)
    k = heads(m.k_proj(m.norm_stored_pattern(stored)), m.hidden_size)
    v = heads(m.v_proj(m.norm_pattern_projection(projection)), m.pattern_size)
    additive = reference.additive_mask(padding, mask, dtype=q.dtype)
    out, p, _ = reference.hopfield_update(q, k, v, m.scaling, m.update_steps_max, mask=additive,
                                          eps=m.update_steps_eps)
    if association:
        return p
    if keep is not None:
        out = (p * keep.to(p.dtype)) @ v
    return m.out_proj(out.transpose(1, 2).flatten(2))


def term_scales(slow, m64, inputs64, seed):
    """Operand scales (accel.numerics) for the gradients that are sums which can cancel, from the float64
    reference: a bias's (of a Linear or LayerNorm), summed over the rows of its layer's output, in units of the
    largest over its features of the summed magnitudes of the per-row terms; beta's, summed over every step's
    logits, in units of the summed magnitudes of the per-logit terms. Without them an exact gradient near 0 has
    no scale: at 0 steps the keys' biases shift every logit of a row alike, which the softmax ignores, so their
    gradient is exactly 0, and beta's gradient sums terms of both signs (each row's logit gradients sum to 0)."""
    outputs, betas = [], []

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outputs.append((name, out))
        return hook

    def association(q, k, beta, mask=None):
        # the reference's association with beta per logit, so that its gradient holds the terms that beta's
        # gradient adds up (for the scale only: the values are the float64 reference's)
        logits = q @ k.transpose(-1, -2)
        b = torch.as_tensor(beta, dtype=q.dtype).detach().expand(logits.shape).clone().requires_grad_()
        betas.append(b)
        return torch.softmax(b * logits + (0 if mask is None else mask), dim=-1)

    handles = [mod.register_forward_hook(keep(name)) for name, mod in m64.named_modules()
               if isinstance(mod, (torch.nn.Linear, torch.nn.LayerNorm))]
    original, reference.association = reference.association, association
    try:
        leaves = [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs64]
        out = slow(m64, *leaves)
    finally:
        reference.association = original
        for handle in handles:
            handle.remove()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out.backward(g)
    scales = {}
    for name, t in outputs:
        key = f"grad of {name}.bias"
        scales[key] = scales.get(key, 0.0) + t.grad.abs().flatten(0, -2).sum(0)
    scales = {key: value.max().item() for key, value in scales.items()}
    for name, _ in m64.named_parameters():
        if name.endswith("scaling"):
            scales[f"grad of {name}"] = sum(b.grad.abs().sum().item() for b in betas)
    return scales


def verdicts(module, fast, slow, inputs, seed=0, perturbations=1):
    """fast(module, *inputs) in float32 against slow (the reference) by the numerics rule (factor 2), output and
    gradients: {name: (fast's, the yardstick of the reference's float32 error, the float64 reference, operand
    scale, Verdict)}. The yardstick is the worst of: slow in float32; slow in float64, rounded to float32; slow in
    float64 on inputs and parameters moved by half an ulp, rounded (one float32 run of the reference is one draw
    of its error). Over 150 draws of every test below: no failure; without term_scales, 19 (the keys' biases at 0
    steps, beta's gradient by up to 17x)."""
    m64 = copy.deepcopy(module).double()
    inputs64 = [x.double() if x.is_floating_point() else x for x in inputs]
    got, ref64 = outputs_and_gradients(fast, module, inputs, seed), outputs_and_gradients(slow, m64, inputs64, seed)
    scales = term_scales(slow, m64, inputs64, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    candidates = [outputs_and_gradients(slow, module, inputs, seed), {k: v.float() for k, v in ref64.items()}]
    for _ in range(perturbations):
        candidates.append({k: v.float() for k, v in outputs_and_gradients(slow, *perturbed_copy(m64, inputs64, gen), seed).items()})
    result = {}
    for name, r64 in ref64.items():
        worst = farthest([c[name] for c in candidates], r64)
        assert got[name].dtype == F32, name
        scale = scales.get(name, 0.0)
        result[name] = (got[name], worst, r64, scale, judge(got[name], worst, r64, scale=scale))
    return result


def assert_module_by_rule(module, fast, slow, inputs, what="", seed=0):
    for name, (got, worst, r64, scale, _) in verdicts(module, fast, slow, inputs, seed).items():
        assert_by_rule(got, worst, r64, f"{what} {name}", scale=scale)


def masked_problem(steps, eps=1e-4):
    m = Hopfield(12, hidden_size=5, output_size=7, pattern_size=3, num_heads=2, update_steps_max=steps,
                 update_steps_eps=eps, stored_pattern_size=9, pattern_projection_size=4)
    stored, state, projection = (torch.randn(3, n, w) for n, w in ((11, 9), (6, 12), (11, 4)))
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 8:] = True
    mask = torch.rand(6, 11) < 0.2
    mask[:, 0] = False
    return m, (stored, state, projection, padding, mask)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_matches_the_reference_on_its_own_projections(steps):
    # without the stopping rule: a row whose association changes by about eps may stop a step earlier in one
    # precision than in the other, which no rounding rule covers; the rule is checked in float64 below
    m, inputs = masked_problem(steps, eps=None)
    assert_module_by_rule(m, lambda m, s, q, p, pad, mask: m((s, q, p), pad, mask), by_hand, inputs, f"{steps} steps")
    m, (stored, state, projection, padding, mask) = masked_problem(steps)
    m.double()
    got = m((stored.double(), state.double(), projection.double()), padding, mask)
    torch.testing.assert_close(got, by_hand(m, stored.double(), state.double(), projection.double(), padding, mask))
    assert got.shape == (3, 6, 7)


def test_batch_first_false_transposes_inputs_and_output():
    b = Hopfield(8, num_heads=2, update_steps_max=2, update_steps_eps=None, batch_first=False)
    x = torch.randn(4, 5, 8)  # (B, L, features); the layer gets (L, B, features), by_hand the batch first
    assert_module_by_rule(b, lambda m, x: m(x.transpose(0, 1)).transpose(0, 1), lambda m, x: by_hand(m, x, x, x),
                          [x], "batch_first=False")


def test_state_dict_dtype_and_eval_mode():
    m = Hopfield(8, num_heads=2, update_steps_max=1, dropout=0.3)
    x = torch.randn(2, 5, 8)
    m.eval()
    fresh = Hopfield(8, num_heads=2, update_steps_max=1, dropout=0.3).eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), m(x))
    # eval: no dropout, the association as the reference makes it
    assert_module_by_rule(m, lambda m, x: m(x), lambda m, x: by_hand(m, x, x, x), [x], "eval")
    torch.testing.assert_close(m.double()(x.double()), by_hand(m, *(x.double(),) * 3))


@pytest.mark.parametrize("steps", [1, 3])
def test_dropout_path_runs_the_same_steps(steps):
    """Training with dropout: the update steps, then dropout on the final association (the mask F.dropout draws
    first in the forward, reproduced from the same seed)."""
    m = Hopfield(8, num_heads=2, update_steps_max=steps, update_steps_eps=None, dropout=0.3).train()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)
    keep = F.dropout(torch.ones(2, 2, 5, 5), 0.3)
    assert (keep == 0).any() and (keep != 0).any()

    def dropped(m, x):
        torch.manual_seed(1)
        return m(x)

    assert_module_by_rule(m, dropped, lambda m, x: by_hand(m, x, x, x, keep=keep), [x], f"dropout, {steps} steps")


def test_learnable_scaling_and_association_matrix():
    m = Hopfield(6, num_heads=3, update_steps_max=2, update_steps_eps=None,
                 scaling=torch.nn.Parameter(torch.tensor(0.7)))
    x = torch.randn(2, 4, 6)
    checked = verdicts(m, lambda m, x: m(x), lambda m, x: by_hand(m, x, x, x), [x])
    assert "grad of scaling" in checked
    for name, (got, worst, r64, scale, _) in checked.items():
        assert_by_rule(got, worst, r64, name, scale=scale)
    padding = torch.tensor([[False, False, True, True], [False] * 4])
    p = m.get_association_matrix(x, padding)
    assert p.shape == (2, 3, 4, 4)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        want32 = by_hand(m, x, x, x, padding, association=True)
        want64 = by_hand(m64, *(x.double(),) * 3, padding, association=True)
    assert_by_rule(p, want32, want64, "association")
    assert (p[0, ..., 2:] == 0).all()  # padding: exactly no weight


def test_pooling_and_lookup_layers():
    pool = HopfieldPooling(8, quantity=3, num_heads=2, output_size=5, update_steps_max=1, update_steps_eps=None)
    x = torch.randn(4, 7, 8)
    assert pool(x).shape == (4, 15)  # (B, quantity * output_size)

    def pooled(pool, x):
        state = pool.pooling_weights.expand(x.shape[0], -1, -1)
        return by_hand(pool.hopfield, x, state, x).flatten(1)

    assert_module_by_rule(pool, lambda m, x: m(x), pooled, [x], "HopfieldPooling")
    layer = HopfieldLayer(8, quantity=10, lookup_weights_as_separated=True, num_heads=2, update_steps_max=2,
                          update_steps_eps=None)
    z = layer(x)
    assert z.shape == (4, 7, 8)
    # the lookup table is one set of stored patterns (batch 1) for the whole batch
    assert_module_by_rule(layer, lambda m, x: m(x), lambda m, x: by_hand(m.hopfield, m.lookup_weights, x,
                                                                         m.target_weights), [x], "HopfieldLayer")
    torch.testing.assert_close(layer(x[:1]), z[:1])


@pytest.mark.parametrize("make", [
    lambda: Hopfield(8, num_heads=2, update_steps_max=2),
    lambda: HopfieldPooling(8, quantity=2, num_heads=2),
    lambda: HopfieldLayer(8, quantity=6, num_heads=2, update_steps_max=1),
])
def test_compiles_with_fullgraph(make):
    m = make()
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = torch.autograd.grad(m(x).sum(), [x, *m.parameters()])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).sum(), [x, *m.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        Hopfield(8, num_heads=0)
    with pytest.raises(ValueError, match="update_steps_max"):
        Hopfield(8, update_steps_max=-1)
    with pytest.raises(ValueError, match="dropout"):
        Hopfield(8, dropout=1.0)
