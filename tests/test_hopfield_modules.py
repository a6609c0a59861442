"""accel.nn.Hopfield, HopfieldPooling and HopfieldLayer: the module against the reference update run on the
module's own projections, masks, batch_first, state_dict, dtype, train/eval with dropout, learnable scaling
and torch.compile(fullgraph=True)."""
import math

import pytest
import torch

from accel.nn import Hopfield, HopfieldLayer, HopfieldPooling
from accel.reference import hopfield as reference


def by_hand(m: Hopfield, stored, state, projection, padding=None, mask=None):
    """The module's forward with the reference loop in place of the op."""
    heads = lambda x, w: x.unflatten(-1, (m.num_heads, w)).transpose(1, 2)
    q = heads(m.q_proj(m.norm_state_pattern(state)), m.hidden_size)
    k = heads(m.k_proj(m.norm_stored_pattern(stored)), m.hidden_size)
    v = heads(m.v_proj(m.norm_pattern_projection(projection)), m.pattern_size)
    additive = reference.additive_mask(padding, mask, dtype=q.dtype)
    out, _, _ = reference.hopfield_update(q, k, v, m.scaling, m.update_steps_max, mask=additive,
                                          eps=m.update_steps_eps)
    return m.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_matches_the_reference_on_its_own_projections(steps):
    m = Hopfield(12, hidden_size=5, output_size=7, pattern_size=3, num_heads=2, update_steps_max=steps,
                 stored_pattern_size=9, pattern_projection_size=4).double()
    stored, state, projection = (torch.randn(3, n, w, dtype=torch.float64) for n, w in ((11, 9), (6, 12), (11, 4)))
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 8:] = True
    mask = torch.rand(6, 11) < 0.2
    mask[:, 0] = False
    got = m((stored, state, projection), padding, mask)
    torch.testing.assert_close(got, by_hand(m, stored, state, projection, padding, mask))
    assert got.shape == (3, 6, 7)


def test_batch_first_false_transposes_inputs_and_output():
    a = Hopfield(8, num_heads=2, update_steps_max=2)
    b = Hopfield(8, num_heads=2, update_steps_max=2, batch_first=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5, 8)
    torch.testing.assert_close(b(x.transpose(0, 1)).transpose(0, 1), a(x))


def test_state_dict_dtype_and_eval_mode():
    m = Hopfield(8, num_heads=2, update_steps_max=1, dropout=0.3)
    x = torch.randn(2, 5, 8)
    m.eval()
    fresh = Hopfield(8, num_heads=2, update_steps_max=1, dropout=0.3).eval()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x))
    torch.testing.assert_close(m.double()(x.double()), by_hand(m, *(x.double(),) * 3))
    m.float().train()
    torch.manual_seed(1)
    dropped = m(x)
    assert not torch.allclose(dropped, m.eval()(x))  # dropout acts in training only


def test_dropout_path_runs_the_same_steps():
    m = Hopfield(8, num_heads=2, update_steps_max=3, update_steps_eps=None, dropout=1e-9).double().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), by_hand(m, x, x, x), rtol=1e-6, atol=1e-8)


def test_learnable_scaling_and_association_matrix():
    m = Hopfield(6, num_heads=3, update_steps_max=2, scaling=torch.nn.Parameter(torch.tensor(0.7)))
    x = torch.randn(2, 4, 6)
    m(x).sum().backward()
    assert m.scaling.grad is not None and torch.isfinite(m.scaling.grad)
    padding = torch.tensor([[False, False, True, True], [False] * 4])
    p = m.get_association_matrix(x, padding)
    assert p.shape == (2, 3, 4, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 4))
    assert (p[0, ..., 2:] == 0).all()


def test_pooling_and_lookup_layers():
    pool = HopfieldPooling(8, quantity=3, num_heads=2, output_size=5, update_steps_max=1)
    x = torch.randn(4, 7, 8, requires_grad=True)
    y = pool(x)
    assert y.shape == (4, 15)
    y.sum().backward()
    assert pool.pooling_weights.grad is not None and x.grad is not None
    layer = HopfieldLayer(8, quantity=10, lookup_weights_as_separated=True, num_heads=2, update_steps_max=2)
    z = layer(x)
    assert z.shape == (4, 7, 8)
    z.sum().backward()
    assert layer.lookup_weights.grad is not None and layer.target_weights.grad is not None
    # the lookup table is one set of stored patterns for the whole batch
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
