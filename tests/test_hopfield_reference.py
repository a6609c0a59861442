"""The Hopfield reference (accel/reference/hopfield.py) against the paper's properties and independent
computations: attention at zero steps, retrieval, the energy's descent and bounds, masks, and the stopping rule.
The fast op of issue 5 is checked against this reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from accel.reference import hopfield as reference


def patterns(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_zero_steps_is_scaled_dot_product_attention():
    q, k, v = patterns(2, 3, 5, 7), patterns(2, 3, 11, 7), patterns(2, 3, 11, 4)
    out, p, taken = reference.hopfield_update(q, k, v, 0.3, steps=0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (taken == 0).all()


def test_one_update_retrieves_a_stored_pattern_from_a_corrupted_query():
    # The paper's setting: well-separated binary patterns, d = 64, 1000 of them; a query with 20% of its
    # entries flipped is pulled back onto its pattern in one update.
    d, N = 64, 1000
    X = torch.randint(0, 2, (N, d), dtype=torch.float64) * 2 - 1
    idx = torch.arange(0, N, 97)
    q = X[idx].clone()
    for row in range(len(idx)):
        q[row, torch.randperm(d)[: d // 5]] *= -1
    out, p, _ = reference.hopfield_update(q, X, X, beta=1.0, steps=1)
    assert (p.argmax(-1) == idx).all()
    torch.testing.assert_close(out, X[idx], atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0, 8.0])
def test_energy_never_increases_and_stays_within_its_bounds(beta):
    X, q = patterns(4, 30, 16), patterns(4, 6, 16) * 2
    trace = reference.energy_trace(q, X, beta, steps=5)
    assert (trace[1:] - trace[:-1] <= 1e-10 * trace.abs().amax()).all()
    # after an update the state lies in the convex hull of the patterns, where 0 <= E <= 2 M^2
    M2 = X.norm(dim=-1).amax(-1, keepdim=True) ** 2
    assert (trace[1:] >= -1e-10).all() and (trace[1:] <= 2 * M2 + 1e-10).all()


def test_energy_matches_its_definition_per_pattern():
    X, xi, beta = patterns(9, 5), patterns(3, 5), 0.7
    E = reference.hopfield_energy(xi, X, beta)
    for r in range(3):
        lse = math.log(sum(math.exp(beta * float(X[i] @ xi[r])) for i in range(9)))
        M = max(float(X[i].norm()) for i in range(9))
        want = -lse / beta + 0.5 * float(xi[r] @ xi[r]) + math.log(9) / beta + 0.5 * M * M
        assert abs(float(E[r]) - want) < 1e-10


def test_key_padding_is_the_same_as_leaving_the_patterns_out():
    q, k, v = patterns(2, 1, 4, 6), patterns(2, 1, 9, 6), patterns(2, 1, 9, 3)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    padding[1, :2] = True
    mask = reference.additive_mask(key_padding_mask=padding)
    out, p, _ = reference.hopfield_update(q, k, v, 0.5, steps=3, mask=mask)
    assert (p[0, ..., 6:] == 0).all() and (p[1, ..., :2] == 0).all()
    for b, keep in ((0, slice(0, 6)), (1, slice(2, 9))):
        want, _, _ = reference.hopfield_update(q[b], k[b, :, keep], v[b, :, keep], 0.5, steps=3)
        torch.testing.assert_close(out[b], want)


def test_boolean_and_additive_association_masks_agree():
    q, k, v = patterns(3, 5, 4), patterns(3, 7, 4), patterns(3, 7, 2)
    blocked = torch.rand(5, 7) < 0.3
    blocked[:, 0] = False  # every state pattern keeps a stored pattern
    as_bool = reference.additive_mask(association_mask=blocked)
    as_float = torch.zeros(5, 7, dtype=torch.float64).masked_fill(blocked, -math.inf)
    a = reference.hopfield_update(q, k, v, 1.0, steps=2, mask=as_bool)
    b = reference.hopfield_update(q, k, v, 1.0, steps=2, mask=as_float)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1][..., blocked] == 0).all()


def test_stopping_rule_freezes_each_row_where_it_converged():
    q, k, v = patterns(2, 12, 8), patterns(2, 20, 8), patterns(2, 20, 3)
    out, p, taken = reference.hopfield_update(q, k, v, 2.0, steps=6, eps=1e-3)
    assert taken.min() >= 1 and taken.max() <= 6 and len(taken.unique()) > 1  # rows stop at different steps
    for b in range(2):
        for r in range(12):
            want, _, _ = reference.hopfield_update(q[b, r:r + 1], k[b], v[b], 2.0, steps=int(taken[b, r]))
            torch.testing.assert_close(out[b, r:r + 1], want)
    _, _, all_taken = reference.hopfield_update(q, k, v, 2.0, steps=6)
    assert (all_taken == 6).all()


def test_shared_stored_patterns_broadcast_over_the_batch():
    q, k, v = patterns(4, 2, 3, 5), patterns(1, 2, 8, 5), patterns(1, 2, 8, 5)
    shared, _, _ = reference.hopfield_update(q, k, v, 0.9, steps=2)
    copied, _, _ = reference.hopfield_update(q, k.expand(4, -1, -1, -1).clone(), v.expand(4, -1, -1, -1).clone(), 0.9,
                                             steps=2)
    torch.testing.assert_close(shared, copied)


def test_negative_steps_are_refused():
    with pytest.raises(ValueError, match="steps"):
        reference.hopfield_update(patterns(1, 2), patterns(3, 2), patterns(3, 2), 1.0, steps=-1)
