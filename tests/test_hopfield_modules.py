"""accel.nn.Hopfield, HopfieldPooling and HopfieldLayer: the module in float32 against the reference update
(accel.reference.hopfield) run on the module's own projections, in float32 and on a float64 copy, by the numerics
rule on the output and the gradients to the inputs and every parameter; masks, batch_first, state_dict, dtype,
train/eval with dropout, learnable scaling and torch.compile(fullgraph=True)."""
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from accel.nn import Hopfield, HopfieldLayer, HopfieldPooling
from accel.numerics import farthest, judge
from accel.reference import hopfield as reference
from conftest import assert_by_rule, outputs_and_gradients, perturbed_copy

F32, F64 = torch.float32, torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


RECORD = None  # a list while term_scales runs: by_hand appends each biased map's output to it


def by_hand(m: Hopfield, stored, state, projection, padding=None, mask=None, keep=None, association=False):
    """The module's forward, written from hflayers' layout with the reference loop in place of the op: rows
    [0, H*hidden) of in_proj_weight (or q_proj_weight) map the state patterns, the next H*hidden (or
    k_proj_weight) the stored patterns, the rest (or v_proj_weight) the projections, with in_proj_bias cut the
    same way. Where the normalised inputs are equal hflayers maps the state patterns for all three, so only
    that normalisation gets a gradient. ``keep``: a dropout mask (already scaled by 1 / (1 - p)) applied to
    the final association; ``association``: return that association instead. Runs with the per-row rule, or
    with none (update_steps_eps None); the per-head rule has its own test."""
    core, H = m.association_core, m.num_heads
    stored, state, projection = m.norm_stored_pattern(stored), m.norm_state_pattern(state), \
        m.norm_pattern_projection(projection)
    if core.in_proj_weight is not None and torch.equal(stored, projection):
        stored = projection = state if torch.equal(state, stored) else stored
    widths = (H * m.hidden_size, H * m.hidden_size, H * m.pattern_size)
    weights = core.in_proj_weight.split(widths) if core.in_proj_weight is not None else \
        (core.q_proj_weight, core.k_proj_weight, core.v_proj_weight)
    biases = core.in_proj_bias.split(widths) if core.in_proj_bias is not None else (None,) * 3
    maps = []
    for x, w, b in zip((state, stored, projection), weights, biases):
        y = F.linear(x, w, b)
        if RECORD is not None and b is not None:
            y.retain_grad()
            RECORD.append(y)
        maps.append(y.unflatten(-1, (H, -1)).transpose(1, 2))
    q, k, v = maps
    additive = reference.additive_mask(padding, mask, dtype=q.dtype)
    out, p, _ = reference.hopfield_update(q, k, v, m.scaling, m.update_steps_max, mask=additive,
                                          eps=m.update_steps_eps)
    if association:
        return p
    if keep is not None:
        out = (p * keep.to(p.dtype)) @ v
    return core.out_proj(out.transpose(1, 2).flatten(2))


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
    global RECORD
    RECORD = []
    try:
        leaves = [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs64]
        out = slow(m64, *leaves)
        in_maps = RECORD
    finally:
        RECORD = None
        reference.association = original
        for handle in handles:
            handle.remove()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out.backward(g)
    scales = {}
    for name, t in outputs:
        if t.grad is None:  # a normalisation hflayers' routing left out (see by_hand)
            continue
        key = f"grad of {name}.bias"
        scales[key] = scales.get(key, 0.0) + t.grad.abs().flatten(0, -2).sum(0)
    scales = {key: value.max().item() for key, value in scales.items()}
    in_proj = [name for name, _ in m64.named_parameters() if name.endswith("in_proj_bias")]
    if in_proj:  # one bias for the three maps: the largest of their scales
        scales[f"grad of {in_proj[0]}"] = max(t.grad.abs().flatten(0, -2).sum(0).max().item() for t in in_maps)
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
                 update_steps_eps=eps, stored_pattern_size=9, pattern_projection_size=4, stopping_rule="row")
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
    assert "grad of _Hopfield__scaling" in checked  # the name hflayers gives a learnable scaling
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
    # unused: the normalisations hflayers' routing leaves out (eagerly None, compiled zero; both read as zero)
    want = torch.autograd.grad(m(x).sum(), [x, *m.parameters()], allow_unused=True, materialize_grads=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).sum(), [x, *m.parameters()], allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        Hopfield(8, num_heads=0)
    with pytest.raises(ValueError, match="update_steps_max"):
        Hopfield(8, update_steps_max=-1, update_steps_eps=None)  # unbounded needs the stopping rule
    with pytest.raises(ValueError, match="dropout"):
        Hopfield(8, dropout=1.0)


# hflayers' interface, written out: argument names in order with their defaults, and state_dict layouts
HOPFIELD_ARGUMENTS = [
    ("input_size", None), ("hidden_size", None), ("output_size", None), ("pattern_size", None), ("num_heads", 1),
    ("scaling", None), ("update_steps_max", 0), ("update_steps_eps", 1e-4),
    ("normalize_stored_pattern", True), ("normalize_stored_pattern_affine", True),
    ("normalize_stored_pattern_eps", 1e-5), ("normalize_state_pattern", True),
    ("normalize_state_pattern_affine", True), ("normalize_state_pattern_eps", 1e-5),
    ("normalize_pattern_projection", True), ("normalize_pattern_projection_affine", True),
    ("normalize_pattern_projection_eps", 1e-5), ("normalize_hopfield_space", False),
    ("normalize_hopfield_space_affine", False), ("normalize_hopfield_space_eps", 1e-5),
    ("stored_pattern_as_static", False), ("state_pattern_as_static", False),
    ("pattern_projection_as_static", False), ("pattern_projection_as_connected", False),
    ("stored_pattern_size", None), ("pattern_projection_size", None), ("batch_first", True),
    ("association_activation", None), ("dropout", 0.0), ("input_bias", True), ("concat_bias_pattern", False),
    ("add_zero_association", False), ("disable_out_projection", False)]
# the wrappers take no normalisation eps and no Hopfield-space eps (hflayers' Hopfield defaults apply)
WRAPPED = [a for a in HOPFIELD_ARGUMENTS if not a[0].endswith("_eps") or a[0] == "update_steps_eps"]
POOLING_ARGUMENTS = [("input_size", inspect.Parameter.empty)] + WRAPPED[1:] + [("quantity", 1), ("trainable", True)]
LAYER_ARGUMENTS = POOLING_ARGUMENTS[:8] + [("lookup_weights_as_separated", False),
                                          ("lookup_targets_as_trainable", True)] + POOLING_ARGUMENTS[8:]


@pytest.mark.parametrize("cls, arguments", [(Hopfield, HOPFIELD_ARGUMENTS), (HopfieldPooling, POOLING_ARGUMENTS),
                                            (HopfieldLayer, LAYER_ARGUMENTS)])
def test_constructor_takes_hflayers_arguments_in_order(cls, arguments):
    parameters = inspect.signature(cls).parameters.values()
    positional = [(p.name, p.default) for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == arguments


@pytest.mark.parametrize("make, layout", [
    (lambda: Hopfield(8), {
        "association_core.in_proj_weight": (24, 8), "association_core.in_proj_bias": (24,),
        "association_core.out_proj.weight": (8, 8), "association_core.out_proj.bias": (8,),
        "norm_stored_pattern.weight": (8,), "norm_stored_pattern.bias": (8,), "norm_state_pattern.weight": (8,),
        "norm_state_pattern.bias": (8,), "norm_pattern_projection.weight": (8,), "norm_pattern_projection.bias": (8,)}),
    (lambda: Hopfield(8, hidden_size=4, pattern_size=3, num_heads=2, stored_pattern_size=6, input_bias=False,
                      normalize_hopfield_space=True, normalize_hopfield_space_affine=True,
                      normalize_pattern_projection=False, normalize_pattern_projection_affine=False), {
        "association_core.p_norm_weight": (4,), "association_core.p_norm_bias": (4,),
        "association_core.q_proj_weight": (8, 8), "association_core.k_proj_weight": (8, 6),
        "association_core.v_proj_weight": (6, 8), "association_core.out_proj.weight": (8, 6),
        "norm_stored_pattern.weight": (6,), "norm_stored_pattern.bias": (6,), "norm_state_pattern.weight": (8,),
        "norm_state_pattern.bias": (8,)}),
    (lambda: Hopfield(8, state_pattern_as_static=True, hidden_size=8, concat_bias_pattern=True,
                      disable_out_projection=True, normalize_state_pattern=False,
                      normalize_state_pattern_affine=False), {
        "association_core.in_proj_weight": (16, 8), "association_core.in_proj_bias": (16,),
        "association_core.bias_k": (1, 1, 8), "association_core.bias_v": (1, 1, 8),
        "norm_stored_pattern.weight": (8,), "norm_stored_pattern.bias": (8,),
        "norm_pattern_projection.weight": (8,), "norm_pattern_projection.bias": (8,)}),
    (lambda: HopfieldPooling(8, quantity=3, batch_first=False, normalize_stored_pattern_affine=False,
                             normalize_state_pattern_affine=False, normalize_pattern_projection_affine=False), {
        "pooling_weights": (3, 1, 8), "hopfield.association_core.in_proj_weight": (24, 8),
        "hopfield.association_core.in_proj_bias": (24,), "hopfield.association_core.out_proj.weight": (8, 8),
        "hopfield.association_core.out_proj.bias": (8,)}),
    (lambda: HopfieldLayer(8, quantity=5, lookup_weights_as_separated=True, pattern_projection_size=4,
                           normalize_stored_pattern=False, normalize_stored_pattern_affine=False,
                           normalize_state_pattern=False, normalize_state_pattern_affine=False,
                           normalize_pattern_projection=False, normalize_pattern_projection_affine=False), {
        "lookup_weights": (1, 5, 8), "target_weights": (1, 5, 4), "hopfield.association_core.q_proj_weight": (8, 8),
        "hopfield.association_core.k_proj_weight": (8, 8), "hopfield.association_core.v_proj_weight": (8, 4),
        "hopfield.association_core.in_proj_bias": (24,), "hopfield.association_core.out_proj.weight": (8, 8),
        "hopfield.association_core.out_proj.bias": (8,)}),
])
def test_state_dict_is_hflayers_layout(make, layout):
    m = make()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == layout
    fresh = make()
    fresh.load_state_dict(m.state_dict(), strict=True)
    # hflayers' initialisation: projections N(0, 0.02), biases zero, normalisations the identity
    for name, p in m.named_parameters():
        normalisation = name.endswith(("p_norm_weight", "p_norm_bias")) or ".norm_" in f".{name}"
        if name.endswith(("in_proj_bias", "out_proj.bias")) or normalisation and name.endswith("bias"):
            assert (p == 0).all(), name
        elif normalisation:
            assert (p == 1).all(), name
        else:
            assert 0.01 < p.std().item() < 0.04, name


def test_layer_lookup_targets_follow_lookup_targets_as_trainable():
    layer = HopfieldLayer(8, quantity=5, lookup_weights_as_separated=True, lookup_targets_as_trainable=False)
    assert layer.lookup_weights.requires_grad and not layer.target_weights.requires_grad
    assert HopfieldLayer(8, quantity=5).target_weights is None


def plain_heads(m, x64):
    """q, k, v (B, H, rows, width) of one input tensor in float64, from hflayers' formula: LayerNorm, then rows
    [0, Hd), [Hd, 2Hd) and [2Hd, ...) of in_proj_weight with in_proj_bias cut the same way."""
    core, H = m.association_core, m.num_heads
    x = F.layer_norm(x64, (x64.shape[-1],), eps=1e-5)
    w, b = core.in_proj_weight.double(), core.in_proj_bias.double()
    d = m.hidden_size * H
    return [F.linear(x, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]).unflatten(-1, (H, -1)).transpose(1, 2)
            for i in range(3)]


def test_default_scaling_is_the_exact_float():
    m = Hopfield(12, num_heads=3).double()
    assert m.scaling == 1 / math.sqrt(4) and isinstance(m.scaling, float)
    m = Hopfield(15, num_heads=5).double()  # 1/sqrt(3) is not a float32
    assert m.scaling == 1 / math.sqrt(3) != float(torch.tensor(1 / math.sqrt(3), dtype=F32))
    x = torch.randn(2, 4, 15, dtype=F64)
    q, k, v = plain_heads(m, x)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), dim=-1)
    want = m.association_core.out_proj((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(m(x), want, rtol=1e-13, atol=1e-15)


def test_per_head_scaling_multiplies_features_as_hflayers():
    """A (num_heads,) scaling: hflayers multiplies feature j of the heads' concatenated state patterns by
    scaling[j % num_heads] (tiled, not one beta per head)."""
    s = torch.tensor([0.5, 2.0], dtype=F64)
    m = Hopfield(8, num_heads=2, hidden_size=3, scaling=s).double()
    x = torch.randn(2, 4, 8, dtype=F64)
    q, k, v = plain_heads(m, x)
    tiled = s[torch.arange(6) % 2].reshape(2, 1, 3)  # head h, feature f: s[(3h + f) % 2]
    p = torch.softmax((q * tiled) @ k.transpose(-1, -2), dim=-1)
    want = m.association_core.out_proj((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(m(x), want, rtol=1e-13, atol=1e-15)


def test_head_stopping_rule():
    """hflayers' rule: after each update a head goes on while it has updates left and some sample's association
    changed by more than eps (Frobenius norm over L x S). Written as a loop per head here; eps between the
    heads' changes, so that the heads stop after different numbers of updates."""
    torch.manual_seed(2)
    m = Hopfield(8, num_heads=2, update_steps_max=6, update_steps_eps=1e-4, scaling=6.0).double()
    x = torch.randn(3, 5, 8, dtype=F64)
    q, k, v = plain_heads(m, x)
    updates = []
    outs = []
    for h in range(2):
        p = torch.softmax(6.0 * q[:, h] @ k[:, h].transpose(-1, -2), dim=-1)
        n = 0
        while n < 6:
            nxt = torch.softmax(6.0 * (p @ k[:, h]) @ k[:, h].transpose(-1, -2), dim=-1)
            change = (nxt - p).flatten(1).norm(dim=1).max()
            p, n = nxt, n + 1
            if change <= 1e-4:
                break
        updates.append(n)
        outs.append(p @ v[:, h])
    assert len(set(updates)) == 2, updates  # the heads stopped after different numbers of updates
    want = m.association_core.out_proj(torch.stack(outs, 1).transpose(1, 2).flatten(2))
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-14)
    # the per-row rule is another model: it need not agree
    row = Hopfield(8, num_heads=2, update_steps_max=6, update_steps_eps=1e-4, scaling=6.0, stopping_rule="row")
    row.load_state_dict(m.state_dict())
    assert row.double()(x).shape == want.shape


def test_reference_path_serves_what_the_op_cannot(monkeypatch):
    """The op serves the default, the row rule and hflayers' head rule (once per group of heads with the same
    update count); per-head tensors, unbounded updates and the head rule under dropout run the reference loop."""
    import accel.nn.hopfield as module
    calls = []
    real = module.hopfield_update
    monkeypatch.setattr(module, "hopfield_update", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    x = torch.randn(2, 4, 8)
    Hopfield(8, num_heads=2)(x)
    Hopfield(8, num_heads=2, update_steps_max=2, stopping_rule="row")(x)
    assert calls == [0, 2]
    torch.manual_seed(2)
    heads = Hopfield(8, num_heads=2, update_steps_max=6, update_steps_eps=1e-4, scaling=6.0)
    heads(torch.randn(3, 5, 8))
    assert sorted(calls[2:]) == [3, 4]  # the counts test_head_stopping_rule finds for these heads
    calls.clear()
    Hopfield(8, num_heads=2, scaling=torch.tensor([1.0, 2.0]))(x)
    Hopfield(8, num_heads=2, update_steps_max=None)(x)
    Hopfield(8, num_heads=2, update_steps_max=2, dropout=0.2).train()(x)
    assert calls == []


def test_uint8_masks_read_as_bool():
    m = Hopfield(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    padding = torch.tensor([[0, 0, 1, 0, 1], [0] * 5], dtype=torch.uint8)
    mask = torch.rand(5, 5) < 0.3
    mask[:, 0] = False
    torch.testing.assert_close(m(x, padding, mask.to(torch.uint8)), m(x, padding.bool(), mask), rtol=0, atol=0)


def test_pooling_flattens_as_hflayers_in_both_layouts():
    pool = HopfieldPooling(8, quantity=3, output_size=4)
    x = torch.randn(2, 6, 8)
    assert pool(x).shape == (2, 12)
    pool_lb = HopfieldPooling(8, quantity=3, output_size=4, batch_first=False)
    pool_lb.load_state_dict({k: v.transpose(0, 1) if k == "pooling_weights" else v
                             for k, v in pool.state_dict().items()})
    out = pool_lb(x.transpose(0, 1))
    assert out.shape == (3, 8)  # hflayers flattens (quantity, batch, output) from dimension 1
    torch.testing.assert_close(out.unflatten(1, (2, 4)).transpose(0, 1).flatten(1), pool(x))


def test_projected_pattern_matrix_and_zero_association():
    m = Hopfield(8, num_heads=2, add_zero_association=True).double()
    x = torch.randn(2, 5, 8, dtype=F64)
    q, k, v = plain_heads(m, x)
    got = m.get_projected_pattern_matrix(x)
    assert got.shape == (2, 2, 6, 4)  # one zero pattern appended, as hflayers returns it
    torch.testing.assert_close(got[:, :, :5], v)
    assert (got[:, :, 5] == 0).all()
    logits = F.pad(q @ k.transpose(-1, -2) * m.scaling, (0, 1))  # the zero pattern's logit is 0
    torch.testing.assert_close(m.get_association_matrix(x), torch.softmax(logits, -1))


def test_hopfield_space_normalisation_connected_projection_and_static_state():
    """Three of hflayers' options from their formulas (float64, no input normalisations, 2 heads of width 3):
    normalize_hopfield_space: each head's q and k layer-normalised over its width (weight and bias
    p_norm_*); pattern_projection_as_connected: the projections go through the stored patterns' map first,
    then v_proj_weight; state_pattern_as_static: the state patterns enter the Hopfield space unmapped, the same
    pattern for every head."""
    plain = dict(normalize_stored_pattern=False, normalize_stored_pattern_affine=False, normalize_state_pattern=False,
                 normalize_state_pattern_affine=False, normalize_pattern_projection=False,
                 normalize_pattern_projection_affine=False, num_heads=2, hidden_size=3)
    m = Hopfield(8, pattern_projection_as_connected=True, normalize_hopfield_space=True,
                 normalize_hopfield_space_affine=True, **plain).double()
    c = m.association_core
    with torch.no_grad():
        c.p_norm_weight.uniform_(0.5, 1.5)
        c.p_norm_bias.uniform_(-0.5, 0.5)
        c.in_proj_bias.normal_()
    stored, state, projection = (torch.randn(2, n, 8, dtype=F64) for n in (6, 4, 6))
    b = c.in_proj_bias
    heads = lambda t: t.unflatten(-1, (2, 3)).transpose(1, 2)  # noqa: E731
    norm = lambda t: F.layer_norm(t, (3,), c.p_norm_weight, c.p_norm_bias, 1e-5)  # noqa: E731
    q = norm(heads(F.linear(state, c.q_proj_weight, b[:6])))
    k = norm(heads(F.linear(stored, c.k_proj_weight, b[6:12])))
    v = heads(F.linear(F.linear(projection, c.k_proj_weight, b[6:12]), c.v_proj_weight, b[12:]))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), -1)
    want = c.out_proj((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(m((stored, state, projection)), want, rtol=1e-13, atol=1e-15)

    s = Hopfield(8, state_pattern_as_static=True, **plain).double()
    c = s.association_core
    raw_state = torch.randn(2, 4, 3, dtype=F64)  # static: width hidden_size
    w, b = c.in_proj_weight, c.in_proj_bias  # rows: stored patterns' map, then projections' (no state map)
    k, v = heads(F.linear(stored, w[:6], b[:6])), heads(F.linear(projection, w[6:], b[6:]))
    p = torch.softmax(raw_state[:, None] @ k.transpose(-1, -2) / math.sqrt(3), -1)
    want = c.out_proj((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(s((stored, raw_state, projection)), want, rtol=1e-13, atol=1e-15)
