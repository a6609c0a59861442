"""accel.ops.hopfield_update against the float64 reference loop (accel/reference/hopfield.py): outputs and all
gradients by the numerics rule for every step count from 0 to 5, masks, shared stored patterns, the stopping
rule, gradcheck, opcheck, compile, and the memory the backward keeps."""
import importlib

import pytest
import torch

from accel.numerics import farthest
from accel.ops import hopfield_update
from accel.reference import hopfield as reference
from conftest import assert_by_rule

module = importlib.import_module("accel.ops.hopfield_update")


def inputs(B=2, H=3, L=5, S=7, d=4, dv=6, shared=False, dtype=torch.float64):
    q = torch.randn(B, H, L, d, dtype=dtype)
    k = torch.randn(1 if shared else B, H, S, d, dtype=dtype)
    v = torch.randn(1 if shared else B, H, S, dv, dtype=dtype)
    return q, k, v


def run(fn, q, k, v, beta, grad, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta)]
    out = fn(*leaves, **kw)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def fast(q, k, v, beta, steps, mask=None, eps=None):
    return hopfield_update(q, k, v, beta, steps, mask=mask, eps=eps)


def slow(q, k, v, beta, steps, mask=None, eps=None):
    return reference.hopfield_update(q, k, v, beta, steps, mask=mask, eps=eps)[0]


def run_permuted(q, k, v, beta, grad, steps, mask, rows, cols):
    """The reference on the rows of q and the stored patterns in other orders, its results put back in the original
    order: the same function, rounded otherwise (another draw of the reference's float32 error)."""
    m = mask
    if m is not None:
        m = m[..., rows, :] if m.shape[-2] > 1 else m
        m = m[..., cols]
    out, gq, gk, gv, gb = run(slow, q[:, :, rows], k[:, :, cols], v[:, :, cols], beta, grad[:, :, rows], steps=steps,
                              mask=m)
    back_rows, back_cols = torch.argsort(rows), torch.argsort(cols)
    return [out[:, :, back_rows], gq[:, :, back_rows], gk[:, :, back_cols], gv[:, :, back_cols], gb]


def assert_matches_over_draws(steps, B=2, H=3, L=9, S=33, d=8, dv=5, shared=False, masked=False, draws=4, orders=3):
    """Float32 outputs and gradients against the float64 reference by the numerics rule (factor 2), each judged
    over `draws` independent problems, with the reference's float32 error per problem the largest of its run and
    `orders` runs on permuted rows and stored patterns. One float32 rounding of the reference is no yardstick for
    few numbers (beta's gradient is one per problem): against one run, the kernel failed the rule on one draw in
    eight, though its rms error equalled the reference's."""
    got, ref32, ref64 = [], [], []
    for _ in range(draws):
        q, k, v = inputs(B=B, H=H, L=L, S=S, d=d, dv=dv, shared=shared)
        beta = torch.tensor(0.5, dtype=torch.float64)
        mask = None
        if masked:
            blocked = torch.rand(L, S) < 0.2
            blocked[:, 0] = False
            mask = reference.additive_mask(association_mask=blocked)
        grad = torch.randn(B, H, L, dv, dtype=torch.float64)
        args32 = (q.float(), k.float(), v.float(), beta.float(), grad.float())
        mask32 = None if mask is None else mask.float()
        r64 = run(slow, q, k, v, beta, grad, steps=steps, mask=mask)
        candidates = [run(slow, *args32, steps=steps, mask=mask32)]
        candidates += [run_permuted(*args32, steps, mask32, torch.randperm(L), torch.randperm(S)) for _ in range(orders)]
        got.append(run(fast, *args32, steps=steps, mask=mask32))
        ref32.append([farthest([c[i] for c in candidates], r)
                      for i, r in enumerate(r64)])
        ref64.append(r64)
    for i, name in enumerate(["out", "grad q", "grad k", "grad v", "grad beta"]):
        g, r32, r64 = (torch.stack([draw[i] for draw in runs]) for runs in (got, ref32, ref64))
        assert_by_rule(g, r32, r64, f"{name} at {steps} steps")


@pytest.mark.parametrize("steps", range(6))
@pytest.mark.parametrize("shared, masked", [(False, False), (True, True)])
def test_matches_the_reference_by_the_numerics_rule(steps, shared, masked):
    assert_matches_over_draws(steps, shared=shared, masked=masked)


@pytest.mark.parametrize("masked", [False, True])
def test_many_rows_in_several_blocks_match_the_reference(masked):
    # 300 rows against 1000 stored patterns: k^T is copied (at least 64 rows), the rows run in blocks of 262 (the
    # last one short), and the stored patterns' gradients accumulate transposed.
    assert_matches_over_draws(2, B=1, H=2, L=300, S=1000, d=8, dv=5, masked=masked, draws=2)


def test_gradcheck_with_masks_padding_shared_patterns_and_stopping():
    q, k, v = inputs(B=2, H=1, L=4, S=6, d=3, dv=2, shared=True)
    beta = torch.tensor(1.3, dtype=torch.float64)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    blocked = torch.zeros(4, 6, dtype=torch.bool)
    blocked[0, 1] = True
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: hopfield_update(q, k, v, b, 3, mask=blocked, key_padding_mask=padding, eps=1e-4), leaves)


def test_stopping_rule_matches_the_reference():
    q, k, v = inputs(L=12, S=20, d=8, dv=3)
    beta = torch.tensor(2.0, dtype=torch.float64)
    _, _, taken = reference.hopfield_update(q, k, v, beta, 6, eps=1e-3)
    assert len(taken.unique()) > 1  # the rows stop at different steps
    grad = torch.randn(2, 3, 12, 3, dtype=torch.float64)
    got = run(fast, q, k, v, beta, grad, steps=6, eps=1e-3)
    want = run(slow, q, k, v, beta, grad, steps=6, eps=1e-3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_key_padding_and_the_association_on_request():
    q, k, v = inputs(L=3, S=8, d=5, dv=5)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    out, p = hopfield_update(q, k, v, 0.8, 2, key_padding_mask=padding, return_association=True)
    want, want_p, _ = reference.hopfield_update(q, k, v, 0.8, 2, mask=reference.additive_mask(padding))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p, want_p)
    assert (p[0, ..., 5:] == 0).all()


def test_one_update_retrieves_a_stored_pattern():
    d, N = 64, 1000
    X = (torch.randint(0, 2, (1, 1, N, d)) * 2 - 1).float()
    idx = torch.arange(0, N, 97)
    q = X[:, :, idx].clone()
    for row in range(len(idx)):
        q[0, 0, row, torch.randperm(d)[: d // 5]] *= -1
    out, p = hopfield_update(q, X, X, 1.0, 1, return_association=True)
    assert (p.argmax(-1)[0, 0] == idx).all()
    torch.testing.assert_close(out, X[:, :, idx], atol=1e-4, rtol=0)


def test_the_backward_keeps_no_association_matrix():
    q, k, v = inputs(B=1, H=2, L=64, S=512, d=8, dv=8, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        hopfield_update(*leaves, 0.5, 4)
    inputs_numel = sum(t.numel() for t in leaves)
    assert sum(saved) <= inputs_numel + 5 * 2 * 64 * (8 + 2) + 2 * 64 + 2  # q_t and row statistics, taken, beta
    assert max(saved) < 64 * 512  # no L x S tensor


def test_sharp_associations_and_fully_masked_rows_behave_as_softmax():
    # logits spread far past float32's exp range (the kernel's exp flushes e^x to 0 below -87.3), S not a
    # multiple of the vector width, and one row with every stored pattern masked: NaN, as torch.softmax gives
    q, k, v = inputs(B=1, H=2, L=6, S=45, d=16, dv=3)
    mask = torch.zeros(6, 45, dtype=torch.bool)
    mask[4] = True
    grad = torch.randn(1, 2, 6, 3, dtype=torch.float64)
    beta = torch.tensor(40.0, dtype=torch.float64)
    additive = reference.additive_mask(association_mask=mask)
    got = run(fast, q.float(), k.float(), v.float(), beta.float(), grad.float(), steps=2, mask=mask)
    ref32 = run(slow, q.float(), k.float(), v.float(), beta.float(), grad.float(), steps=2, mask=additive.float())
    ref64 = run(slow, q, k, v, beta, grad, steps=2, mask=additive)
    assert got[0][:, :, 4].isnan().all() and not got[0][:, :, [0, 1, 2, 3, 5]].isnan().any()
    keep = [0, 1, 2, 3, 5]
    assert_by_rule(got[0][:, :, keep], ref32[0][:, :, keep], ref64[0][:, :, keep], "out of the rows not masked")


def test_row_blocks_give_the_same_result(monkeypatch):
    q, k, v = inputs(L=10, S=6)
    grad = torch.randn(2, 3, 10, 6, dtype=torch.float64)
    beta = torch.tensor(0.9, dtype=torch.float64)
    whole = run(fast, q, k, v, beta, grad, steps=3, eps=1e-2)
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 2 * 3 * 6 * 3)  # blocks of 3 rows
    blocked = run(fast, q, k, v, beta, grad, steps=3, eps=1e-2)
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b)


def test_opcheck_and_compile():
    q, k, v = (t.requires_grad_() for t in inputs(L=4, S=5, d=3, dv=2))
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    q_strided = torch.randn(2, 3, 3, 4, dtype=torch.float64).transpose(-1, -2).requires_grad_()  # (2, 3, 4, 3)
    for args in ((q, k, v, beta, 2, mask, 1e-3, True), (q, k, v, beta, 0, None, None, False),
                 (q_strided, k, v, beta, 1, None, None, False)):
        torch.library.opcheck(torch.ops.accel.hopfield_update.default, args)
    compiled = torch.compile(lambda q, k, v, b: hopfield_update(q, k, v, b, 3).sum(), fullgraph=True,
                             backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, beta), [q, k, v, beta])
    want = torch.autograd.grad(slow(q, k, v, beta, 3).sum(), [q, k, v, beta])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: hopfield_update(q[0], k, v, 1.0), "`q` must have 4 dimensions"),
    (lambda q, k, v: hopfield_update(q, k[..., :2], v, 1.0), "`k` must have shape"),
    (lambda q, k, v: hopfield_update(q, k, v[:, :, :3], 1.0), "`v` must have shape"),
    (lambda q, k, v: hopfield_update(q, k.float(), v, 1.0), "float32 or float64 like `q`"),
    (lambda q, k, v: hopfield_update(q, k, v, 1.0, steps=-1), "`steps`"),
    (lambda q, k, v: hopfield_update(q, k, v, float("nan")), "`beta`"),
    (lambda q, k, v: hopfield_update(q, k, v, 1.0, eps=float("inf")), "`eps`"),
    (lambda q, k, v: hopfield_update(q, k, v, 1.0, mask=torch.zeros(3, 3)), "does not broadcast"),
    (lambda q, k, v: hopfield_update(q, k, v, 1.0, key_padding_mask=torch.zeros(2, 7)), "key_padding_mask"),
])
def test_bad_input_raises_a_clear_error(call, match):
    q, k, v = inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v)


def test_energy_trace_matches_the_reference_and_never_increases():
    q, k, v = inputs(L=6, S=30, d=16, dv=4)
    q = q * 2
    for beta in (0.2, 1.0, 5.0):
        out, energy = hopfield_update(q, k, v, beta, 5, return_energy=True)
        torch.testing.assert_close(energy, reference.energy_trace(q, k, beta, 5))
        assert (energy[1:] - energy[:-1] <= 1e-10 * energy.abs().amax()).all()


def test_energy_with_key_padding_counts_the_stored_patterns_that_remain():
    q, k, v = inputs(B=2, H=1, L=3, S=9, d=4, dv=4)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    _, energy = hopfield_update(q, k, v, 0.6, 2, key_padding_mask=padding, return_energy=True)
    torch.testing.assert_close(energy[:, 1], reference.energy_trace(q[1], k[1, :, :6], 0.6, 2))
    with pytest.raises(ValueError, match="return_energy"):
        hopfield_update(q, k, v, 0.6, 2, mask=torch.zeros(3, 9), return_energy=True)


def test_hopfield_energy_op_matches_the_definition_and_has_gradients():
    from accel.ops import hopfield_energy
    xi, X = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(hopfield_energy(xi, X, 0.4), reference.hopfield_energy(xi, X, 0.4))
    leaves = [xi.requires_grad_(), X.requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, b: hopfield_energy(a, b, 1.7), leaves)
    with pytest.raises(ValueError, match="`X` must have shape"):
        hopfield_energy(xi, X[..., :3], 1.0)


def test_no_state_patterns_give_zero_pattern_gradients(poisoned_outputs):
    # no block of rows runs, so no product ever writes the stored patterns' gradients: they must still be zeros
    q = torch.randn(1, 2, 0, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 4, requires_grad=True), torch.randn(1, 2, 5, 3, requires_grad=True)
    grads = torch.autograd.grad(hopfield_update(q, k, v, 0.5, 2), (q, k, v), torch.ones(1, 2, 0, 3))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
