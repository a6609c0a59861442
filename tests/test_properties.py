"""Property-based tests (hypothesis) of every public op against its float64 reference, one section per op.

Each property draws shapes (1, primes, and sizes just past the C++ kernels' vector widths, tiles, words and
groups), layouts (transposed, sliced with an odd offset, broadcast by expand, channels-last), dtypes and option
values, and judges the op by DESIGN.md's numerics rule (forward and, where the op has a backward, gradients) or
exactly for the integer ops. Tensors come from a torch.Generator seeded by a drawn integer, so an example is
fully described by what hypothesis prints.

17 properties (one per op, two for quant_matmul; pack/unpack, quantize/dequantize/fake_quantize and
binary_matmul/binary_linear share sections) of 20 to 40 examples each, and a check that every public op has one.

Replay: the profile below is derandomized (the same examples on every run, no example database), so a failure
found once is a failure on every run; each failure that led to a fix is pinned as an explicit @example on its
property, so it replays even if the generated examples change.
"""
import math
import os
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import accel.ops
from accel.ops import (batch_norm_mix, binary_linear, binary_matmul, causal_conv, darts_pool_branches, dequantize,
                       depthwise_conv2d, fake_quantize, hopfield_energy, hopfield_update, krylov_kernel, mixed_op,
                       pack_bits, quant_matmul, quantize, quantize_to_points, rk_finalize, rk_stage, unpack_bits)
from accel.numerics import farthest, operand_scale
from accel.ops.quantize import CODES_PER_BLOCK, unpack_codes
from accel.reference import binary as binary_ref
from accel.reference import depthwise_conv2d as depthwise_ref
from accel.reference import hopfield as hopfield_ref
from accel.reference import lssl as lssl_ref
from accel.reference import mixed_op as mixed_ref
from accel.reference import ode as ode_ref
from accel.reference import quant as quant_ref
from conftest import assert_by_rule

settings.register_profile(
    "accel-properties",
    derandomize=True,  # the same examples every run: CI and local runs agree, failures replay
    database=None,  # nothing to store: derandomized runs never read it, and failures are pinned with @example
    deadline=None,  # timings on a shared machine vary too much for one
    print_blob=True,
    # The autouse `seeded` fixture of conftest only seeds the global RNG, which these tests do not use.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# A wider search, not derandomized, for looking for new failures locally:
# ACCEL_PROPERTIES=search python -m pytest tests/test_properties.py (then pin what it finds with @example).
settings.register_profile("accel-properties-search", settings.get_profile("accel-properties"), derandomize=False)
SEARCH = os.environ.get("ACCEL_PROPERTIES") == "search"


def examples(n: int):
    """The profile with n examples for one property (costly properties get fewer; 10x as many in a search)."""
    if SEARCH:
        return settings(settings.get_profile("accel-properties-search"), max_examples=10 * n)
    return settings(settings.get_profile("accel-properties"), max_examples=n)


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
seeds = st.integers(0, 2 ** 31 - 1)


def sizes(*special: int, low: int = 1, high: int = 9):
    """A dimension: small random sizes, or one of the boundary sizes given (1, primes, just past a block)."""
    return st.one_of(st.integers(low, high), st.sampled_from(special)) if special else st.integers(low, high)


# ---- layouts: an input of logical shape `shape` stored as a base tensor viewed through a function ----------------

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


class Laid(NamedTuple):
    """An input in a layout: ``view(base)``. by_rule makes the view of the rounded base a leaf, so that gradients
    are the op's own (an expanded input's is not summed over its broadcast dimensions)."""
    base: torch.Tensor
    view: Callable

    def __call__(self, dtype=None) -> torch.Tensor:
        return self.view(self.base if dtype is None else self.base.to(dtype))


def arrange(shape, layout: str, gen: torch.Generator, scale: float = 1.0, shift: float = 0.0, broadcast=None):
    """Laid(base, view): a float64 base tensor of fresh random data and the view that gives ``shape`` from it.
    ``broadcast``: the dimensions that "expanded" broadcasts (default: the first one larger than 1, and the last
    with 3 or more dimensions).

    transposed: the last two dimensions swapped in memory; sliced: every other element of a longer last
    dimension, from an odd offset; expanded: dimensions broadcast from size 1 (stride 0); channels_last: NHWC."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base_shape = shape[:-2] + (shape[-1], shape[-2])
        view = lambda t: t.transpose(-1, -2)  # noqa: E731
    elif layout == "sliced" and len(shape) >= 1:
        base_shape = shape[:-1] + (2 * shape[-1] + 1,)
        view = lambda t: t[..., 1::2]  # noqa: E731
    elif layout == "expanded" and any(s > 1 for s in shape):
        if broadcast is None:
            first = next(i for i, s in enumerate(shape) if s > 1)
            broadcast = (first, len(shape) - 1) if len(shape) >= 3 else (first,)
        base_shape = tuple(1 if i in broadcast else s for i, s in enumerate(shape))
        view = lambda t: t.expand(shape)  # noqa: E731
    elif layout == "channels_last" and len(shape) == 4:
        n, c, h, w = shape
        base_shape = (n, h, w, c)
        view = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    else:
        base_shape = shape
        view = lambda t: t  # noqa: E731
    base = torch.randn(base_shape, generator=gen, dtype=F64) * scale + shift
    return Laid(base, view)


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t in another memory layout: "transposed" (the last two dimensions swapped in memory) or
    "sliced" (every other element of a longer last dimension); others as they are."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    return t


def _leaf(t, dtype, grad: bool):
    if isinstance(t, Laid):
        return t.view(t.base.detach().to(dtype, copy=True)).requires_grad_(grad)
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(dtype, copy=True).requires_grad_(grad)
    return t


def _rounded(t, dtype):
    if isinstance(t, Laid):
        return Laid(t.base.to(dtype), t.view)
    return t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _perturbed(t, eps: float, gen: torch.Generator):
    """t with every value moved by up to half a unit in the last place of a dtype with machine epsilon eps: the
    rounding that dtype gives an input, simulated in float64."""
    def move(x):
        return x * (1 + eps / 2 * (2 * torch.rand(x.shape, generator=gen, dtype=F64) - 1))
    if isinstance(t, Laid):
        return Laid(move(t.base), t.view)
    return move(t) if isinstance(t, torch.Tensor) and t.dtype == F64 else t


def _nudged(t, dtype, gen: torch.Generator):
    """t rounded to dtype, then each value moved to a neighbour within an ulp or so, exactly representable in
    dtype: another input on which a computation in dtype and one in float64 start from the same numbers."""
    eps = torch.finfo(dtype).eps
    def move(x):
        return (x.to(dtype).double() * (1 + eps * (2 * torch.rand(x.shape, generator=gen, dtype=F64) - 1))).to(dtype)
    if isinstance(t, Laid):
        return Laid(move(t.base).double(), t.view)
    return move(t).double() if isinstance(t, torch.Tensor) and t.dtype == F64 else t


# Draws of the reference's arithmetic error per example (see by_rule): more where an output or a gradient has
# few numbers, whose largest error is one draw of few.
DRAWS, FEW_DRAWS, FEW = 2, 16, 16


def by_rule(fast, reference, inputs, dtype, seed, differentiable=(), grad_of=None, factor=2.0, variants=()):
    """DESIGN.md's numerics rule on every output of ``fast`` and on the gradients of sum_i <g_i, output_i> (random
    g_i, for the outputs indexed by ``grad_of``, default all) with respect to the inputs indexed by
    ``differentiable``.

    ``inputs`` are float64 tensors, Laid inputs (whose views become the leaves) and other arguments (passed as
    they are). The fast op and the reference run on the inputs rounded to ``dtype``, the float64 reference on the
    inputs as drawn: the rounding of the inputs is part of every computation's error in ``dtype``.

    The reference's own error in ``dtype`` is the largest of several draws of it, since one draw is often near 0
    on ill-conditioned outputs (saturated softmaxes, cancelling sums) or outputs of a few numbers (beta's gradient
    is one): of two normal errors, |x| > 2 |y| in 30% of the draws. The draws: the reference run in ``dtype``;
    ``variants`` of it (the same sums in other orders); the float64 reference on the rounded inputs and on inputs
    moved by up to half an ulp, outputs rounded (what rounding alone costs); and the reference's arithmetic error
    on nudged inputs (in ``dtype`` against float64 on the same numbers, DRAWS of them, FEW_DRAWS where an output
    or gradient has fewer than FEW numbers) added to the rounded inputs' float64 result.

    Errors are in units of the output's scale or the operands' (accel.numerics): the inputs' largest magnitude
    for an output, times the upstream gradient's for a gradient, so that a reference that is exactly 0 (S = 1 in
    a softmax, one live branch of a mix) is judged by the rounding its terms allow."""
    gen = torch.Generator().manual_seed(seed + 1)
    eps = torch.finfo(dtype).eps
    in_scale = operand_scale(*[t.base if isinstance(t, Laid) else t for t in inputs])
    rounded = [_rounded(t, dtype) for t in inputs]

    def run(fn, args, cast):
        leaves = [_leaf(t, cast, i in differentiable) for i, t in enumerate(args)]
        outs = fn(*leaves)
        return leaves, list(outs) if isinstance(outs, (tuple, list)) else [outs]

    fast_run, ref64 = run(fast, rounded, dtype), run(reference, inputs, F64)
    sizes_ = [o.numel() for o in ref64[1]] + [ref64[0][j].numel() for j in differentiable]
    draws = 0 if dtype == F64 else FEW_DRAWS if min(sizes_, default=FEW) < FEW else DRAWS
    nudged = [[_nudged(t, dtype, gen) for t in inputs] for _ in range(draws)]
    in_dtype = [run(reference, rounded, dtype)] + [run(v, rounded, dtype) for v in variants]
    simulated = [run(reference, args, F64) for args in (rounded, [_perturbed(t, eps, gen) for t in inputs])]
    arithmetic = [(run(reference, args, dtype), run(reference, args, F64)) for args in nudged]

    def drawn(base64, in_d, at64):
        """The rounded inputs' float64 result plus one draw of the reference's arithmetic error."""
        return base64.detach() + (in_d.detach().double() - at64.detach())

    for i, (f, r64) in enumerate(zip(fast_run[1], ref64[1])):
        assert f.dtype == dtype, f"output {i}: dtype {f.dtype}, expected {dtype}"
        candidates = [r[1][i] for r in in_dtype] + [r[1][i].to(dtype) for r in simulated]
        candidates += [drawn(simulated[0][1][i], d[1][i], a[1][i]) for d, a in arithmetic]
        assert_by_rule(f, farthest(candidates, r64), r64, f"output {i}", factor, in_scale)
    if not differentiable:
        return
    grad_of = range(len(ref64[1])) if grad_of is None else grad_of
    g64 = {i: torch.randn(ref64[1][i].shape, generator=gen, dtype=F64) for i in grad_of}

    def grads(run_, g):
        leaves, outs = run_
        return torch.autograd.grad([outs[i] for i in grad_of], [leaves[j] for j in differentiable],
                                   [g[i].to(outs[i].dtype) for i in grad_of], allow_unused=True,
                                   materialize_grads=True)

    g_dtype = {i: g.to(dtype) for i, g in g64.items()}
    g_rounded = {i: g.double() for i, g in g_dtype.items()}
    fast_grads, grads64 = grads(fast_run, g_dtype), grads(ref64, g64)
    candidates = [grads(r, g_dtype) for r in in_dtype]
    base = grads(simulated[0], g_rounded)
    candidates += [[t.to(dtype) for t in base],
                   [t.to(dtype) for t in grads(simulated[1], {i: _perturbed(g, eps, gen) for i, g in g64.items()})]]
    candidates += [[drawn(b, d, a) for b, d, a in zip(base, grads(d_run, g_dtype), grads(a_run, g_rounded))]
                   for d_run, a_run in arithmetic]
    g_scale = in_scale * operand_scale(*g64.values())
    for n, j in enumerate(differentiable):
        assert_by_rule(fast_grads[n], farthest([c[n] for c in candidates], grads64[n]), grads64[n],
                       f"grad of input {j}", factor, g_scale)


# ---- mixed_op (csrc/cpu/mixed_op.cpp: 16 lanes, blocks of 1024, reduction chunks of 32768) ----------------------

MIXED_NUMELS = (1, 15, 16, 17, 1023, 1025, 32769)


@examples(30)
@given(shape=st.one_of(st.lists(sizes(7, 13, 17, high=6), min_size=1, max_size=4),
                      st.sampled_from(MIXED_NUMELS).map(lambda n: [n])),
       K=sizes(8, high=5), dtype=st.sampled_from([F32, F64, BF16]), mode=st.sampled_from(["alpha", "weights"]),
       tau=st.floats(0.1, 4.0), off=st.lists(st.booleans(), min_size=8, max_size=8),
       layouts=st.lists(st.sampled_from(LAYOUTS + ("channels_last",)), min_size=8, max_size=8), seed=seeds)
# Exact-zero references: one live branch, whose weight is exactly 1, so every weight's gradient is exactly 0.
@example(shape=[33], K=4, dtype=F32, mode="alpha", tau=0.7, off=[False] + [True] * 7, layouts=["sliced"] * 8, seed=4)
@example(shape=[32769], K=3, dtype=F64, mode="alpha", tau=1.0, off=[False] + [True] * 7, layouts=["contiguous"] * 8,
         seed=9)
def test_mixed_op(shape, K, dtype, mode, tau, off, layouts, seed):
    gen = torch.Generator().manual_seed(seed)
    arranged = [arrange(shape, layouts[k], gen) for k in range(K)]
    if mode == "weights":
        mix = torch.rand(K, generator=gen, dtype=F64) + 0.1
        mix[torch.tensor(off[:K])] = 0.0  # exactly-zero weights switch their branch off
    else:
        mix = torch.randn(K, generator=gen, dtype=F64)
        mix[torch.tensor(off[:K])] = -math.inf  # softmax weight exactly 0
        mix[0] = mix[0] if math.isfinite(mix[0]) else 0.5  # at least one branch on

    def fast(*leaves):
        ys = list(leaves[:K])
        return mixed_op(ys, alpha=leaves[K], tau=tau) if mode == "alpha" else mixed_op(ys, weights=leaves[K])

    def reference(*leaves):
        return mixed_ref.mixed_op(list(leaves[:K]), leaves[K], tau if mode == "alpha" else None)

    by_rule(fast, reference, arranged + [mix], dtype, seed, differentiable=range(K + 1))


# ---- batch_norm_mix (csrc/cpu/batch_norm_mix.cpp: planes summed in 16 lanes) --------------------------------------

def _norms(K, C, training, momentum, eps, running, dtype, dims):
    kind = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    bns = []
    for k in range(K):
        bn = kind(C, affine=False, momentum=momentum, eps=eps).to(dtype)
        bn.running_mean.copy_(running[k, 0])
        bn.running_var.copy_(running[k, 1])
        bns.append(bn.train(training))
    return bns


@examples(25)
@given(K=sizes(high=4), N=sizes(high=3), C=sizes(high=4),
       plane=st.sampled_from([(1,), (1, 1), (3, 5), (4, 4), (1, 17), (5, 7), (3, 11)]),
       training=st.booleans(), dtype=st.sampled_from([F32, F64]), momentum=st.floats(0.01, 1.0),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), shift=st.sampled_from([0.0, 20.0]),
       layout=st.sampled_from(LAYOUTS + ("channels_last",)), seed=seeds)
def test_batch_norm_mix(K, N, C, plane, training, dtype, momentum, eps, shift, layout, seed):
    shape = (N, C, *plane)
    if training and N * math.prod(plane) <= 2:
        # one value per channel is refused; with two, both normalise to -1 and +1 and the gradient is rounding
        # noise around 0, which a relative error cannot judge
        plane, shape = (3,), (N, C, 3)
    gen = torch.Generator().manual_seed(seed)
    # channel means far from 0 next to their spread: one-pass variances would cancel
    # (expanded along C; along N, H or W it would repeat a channel's values, too few distinct ones for batch
    # statistics in the small planes)
    arranged = [arrange(shape, layout, gen, scale=3.0, shift=shift, broadcast=(1,)) for _ in range(K)]
    running = torch.stack([torch.randn(K, C, generator=gen, dtype=F64),
                           torch.rand(K, C, generator=gen, dtype=F64) + 0.5], 1)
    weights = torch.rand(K, generator=gen, dtype=F64) + 0.1

    def outputs(fn, leaves):
        bns = _norms(K, C, training, momentum, eps, running, leaves[0].dtype, len(shape))
        out = fn(list(leaves[:K]), leaves[K], bns)
        return [out] + [bn.running_mean.clone() for bn in bns] + [bn.running_var.clone() for bn in bns]

    def eager(zs, w, bns):
        return sum(w[k] * bn(z) for k, (z, bn) in enumerate(zip(zs, bns)))

    by_rule(lambda *l: outputs(batch_norm_mix, l), lambda *l: outputs(eager, l), arranged + [weights],
            dtype, seed, differentiable=range(K + 1), grad_of=[0])


# ---- darts_pool_branches (csrc/cpu/darts_pool_branches.cpp; float32 only) -----------------------------------------

@examples(20)
@given(N=sizes(high=3), C=sizes(high=3), H=sizes(high=6), W=sizes(16, 17, high=6), training=st.booleans(),
       momentum=st.floats(0.01, 1.0), eps=st.sampled_from([1e-5, 1e-2]),
       layout=st.sampled_from(LAYOUTS + ("channels_last",)), seed=seeds)
def test_darts_pool_branches(N, C, H, W, training, momentum, eps, layout, seed):
    if training and N * H * W < 16:
        # Small planes pool to few distinct values (a 3x3 window covers a plane of 2 x 2, and a max often wins
        # several windows): a channel with one or two normalises to 0 or to -1 and +1, and its gradients are
        # rounding noise around 0, which a relative error cannot judge. A larger batch gives every channel enough.
        N = -(-16 // (H * W))
    gen = torch.Generator().manual_seed(seed)
    # expanded along C (along N, H or W it would repeat a channel's values, too few distinct ones for batch
    # statistics in the small planes) and, in eval, along W too: equal neighbours, so max-pool ties
    x = arrange((N, C, H, W), layout, gen, broadcast=(1,) if training else (1, 3))
    running = torch.stack([torch.randn(C, generator=gen, dtype=F64), torch.rand(C, generator=gen, dtype=F64) + 0.5,
                           torch.randn(C, generator=gen, dtype=F64), torch.rand(C, generator=gen, dtype=F64) + 0.5])
    weights = torch.rand(2, generator=gen, dtype=F64) + 0.1

    def bns(dtype):
        out = []
        for j in range(2):
            bn = nn.BatchNorm2d(C, affine=False, momentum=momentum, eps=eps).to(dtype).train(training)
            bn.running_mean.copy_(running[2 * j])
            bn.running_var.copy_(running[2 * j + 1])
            out.append(bn)
        return out

    def fast(x, w):
        max_bn, avg_bn = bns(x.dtype)
        out = darts_pool_branches(x, w, max_bn, avg_bn)
        return [out, max_bn.running_mean, max_bn.running_var, avg_bn.running_mean, avg_bn.running_var]

    def eager(x, w):
        max_bn, avg_bn = bns(x.dtype)
        out = (w[0] * max_bn(nn.functional.max_pool2d(x, 3, 1, 1)) +
               w[1] * avg_bn(nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        return [out, max_bn.running_mean, max_bn.running_var, avg_bn.running_mean, avg_bn.running_var]

    by_rule(fast, eager, [x, weights], F32, seed, differentiable=(0, 1), grad_of=[0])


# ---- depthwise_conv2d (csrc/cpu/depthwise_conv2d.cpp: tiles of 16 columns, at most 64 taps on the fused path) ----

@examples(40)
@given(N=sizes(high=2), C=sizes(high=3), H=sizes(16, 17, high=12), W=sizes(15, 16, 17, 18, 33, 35, high=12),
       kh=sizes(high=5), kw=sizes(9, high=5), stride=st.tuples(sizes(high=3), sizes(5, high=3)),
       dilation=st.tuples(sizes(high=2), sizes(high=3)), pad=st.tuples(st.integers(0, 3), st.integers(0, 5)),
       dtype=st.sampled_from([F32, F64]), layout=st.sampled_from(LAYOUTS + ("channels_last",)), seed=seeds)
# Found by this property: at stride > 1 the fused backward's padded copy of x was narrower than x (heap overflow).
@example(N=1, C=1, H=3, W=18, kh=1, kw=1, stride=(1, 3), dilation=(1, 1), pad=(0, 0), dtype=F64, layout="contiguous",
         seed=0)
def test_depthwise_conv2d(N, C, H, W, kh, kw, stride, dilation, pad, dtype, layout, seed):
    out_h = (H + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (W + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    assume(out_h >= 1 and out_w >= 1)  # the op rejects geometries with an empty output
    gen = torch.Generator().manual_seed(seed)
    x = arrange((N, C, H, W), layout, gen)
    weight = torch.randn(C, 1, kh, kw, generator=gen, dtype=F64)
    by_rule(lambda x, w: depthwise_conv2d(x, w, stride, pad, dilation),
            lambda x, w: depthwise_ref.depthwise_conv2d(x, w, stride, pad, dilation),
            [x, weight], dtype, seed, differentiable=(0, 1))


# ---- krylov_kernel (csrc/cpu/krylov_kernel.cpp: blocks of c steps) ------------------------------------------------

@examples(20)
@given(H=sizes(high=3), N=sizes(8, 9, 17, high=6), M=sizes(high=3),
       L=sizes(2, 3, 15, 16, 17, 63, 65, 129, 257, high=40),
       radius=st.floats(0.3, 0.98), dtype=st.sampled_from([F32, F64]), transposed=st.booleans(), seed=seeds)
# Exact-zero reference: at L = 1 the kernel is C dB, so dA's gradient is exactly 0.
@example(H=2, N=9, M=2, L=1, radius=0.9, dtype=F32, transposed=True, seed=3)
@example(H=1, N=8, M=1, L=1, radius=0.5, dtype=F64, transposed=False, seed=8)
def test_krylov_kernel(H, N, M, L, radius, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    dA = torch.randn(H, N, N, generator=gen, dtype=F64)
    dA = dA / torch.linalg.matrix_norm(dA, ord=2)[:, None, None] * radius  # stable: ||dA^l|| <= radius^l
    dB = torch.randn(H, N, generator=gen, dtype=F64)
    C = torch.randn(H, M, N, generator=gen, dtype=F64)
    if transposed:  # column-major matrices
        dA, C = (Laid(t.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)) for t in (dA, C))
    by_rule(lambda a, b, c: krylov_kernel(a, b, c, L), lambda a, b, c: lssl_ref.krylov_naive(a, b, c, L),
            [dA, dB, C], dtype, seed, differentiable=(0, 1, 2))


# ---- causal_conv (csrc/cpu/causal_conv.cpp: direct sums up to L = 128 with M = 1, 8 features per vector, 8 rows
# per register block; FFTs above) ------------------------------------------------------------------------------------

@examples(30)
@given(B=sizes(high=2), L=sizes(8, 9, 17, 64, 65, 127, 128, 129, 130, high=12), H=sizes(7, 8, 9, 17, high=4),
       M=sizes(high=2), kernel_len=st.floats(0.0, 1.0), reverse_len=st.one_of(st.none(), st.floats(0.0, 1.0)),
       with_D=st.booleans(), activation=st.sampled_from([None, "gelu"]), dtype=st.sampled_from([F32, F64]),
       layout=st.sampled_from(LAYOUTS), seed=seeds)
def test_causal_conv(B, L, H, M, kernel_len, reverse_len, with_D, activation, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    Lk = max(1, round(kernel_len * L))
    u = arrange((B, L, H), layout, gen)
    K = torch.randn(H, M, Lk, generator=gen, dtype=F64) / Lk ** 0.5
    D = torch.randn(H, M, generator=gen, dtype=F64) if with_D else None
    Kr = None
    if reverse_len is not None:
        Lr = max(1, round(reverse_len * L))
        Kr = torch.randn(H, M, Lr, generator=gen, dtype=F64) / Lr ** 0.5
    by_rule(lambda u, K, D, Kr: causal_conv(u, K, D, activation, Kr),
            lambda u, K, D, Kr: lssl_ref.causal_conv(u, K, D, activation, Kr),
            [u, K, D, Kr], dtype, seed, differentiable=[i for i, t in enumerate([u, K, D, Kr]) if t is not None])


# ---- hopfield_update (csrc/cpu/hopfield_update.cpp: blocks of rows, 8-float vectors) ------------------------------

@examples(30)
@given(B=sizes(high=2), H=sizes(high=2), L=sizes(high=9), S=sizes(8, 9, 16, 17, 33, high=7), d=sizes(8, 9, high=5),
       dv=sizes(8, 9, high=4), steps=st.integers(0, 4), beta=st.floats(0.05, 3.0), shared=st.booleans(),
       mask=st.sampled_from([None, "bool", "float", "padding", "one_key"]), dtype=st.sampled_from([F32, F64]),
       stop=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds)
# Exact-zero references: with one stored pattern, or every key but one masked, the association is exactly 1 and
# q's gradient exactly 0 (the kernel's is rounding, judged against the operands' scale).
@example(B=1, H=1, L=1, S=1, d=9, dv=1, steps=0, beta=1.0, shared=False, mask=None, dtype=F64, stop=False,
         layout="contiguous", seed=0)
@example(B=2, H=2, L=3, S=1, d=8, dv=3, steps=2, beta=2.0, shared=True, mask=None, dtype=F32, stop=False,
         layout="transposed", seed=5)
@example(B=2, H=1, L=4, S=9, d=5, dv=2, steps=1, beta=3.0, shared=False, mask="one_key", dtype=F32, stop=False,
         layout="contiguous", seed=3)
@example(B=1, H=2, L=2, S=7, d=9, dv=1, steps=3, beta=1.0, shared=True, mask="one_key", dtype=F64, stop=True,
         layout="sliced", seed=11)
# Found by this property: at 2 steps with sharp rows, q's gradient had 25x the float32 reference's error: the
# backward normalised its recomputed logits by the forward's sum (csrc/cpu/hopfield_update.cpp).
@example(B=1, H=2, L=2, S=8, d=9, dv=1, steps=2, beta=3.0, shared=False, mask=None, dtype=F32, stop=False,
         layout="contiguous", seed=1)
# Found by this property: v's gradient of six numbers (see test_hopfield_energy's examples).
@example(B=2, H=1, L=2, S=2, d=9, dv=3, steps=3, beta=0.7572021109307868, shared=True, mask=None, dtype=F32,
         stop=False, layout="sliced", seed=17818)
def test_hopfield_update(B, H, L, S, d, dv, steps, beta, shared, mask, dtype, stop, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    q = arrange((B, H, L, d), layout, gen)
    kv_batch = 1 if shared else B
    k = torch.randn(kv_batch, H, S, d, generator=gen, dtype=F64)
    v = torch.randn(kv_batch, H, S, dv, generator=gen, dtype=F64)
    association_mask = key_padding = None
    additive = None
    if mask == "bool":
        association_mask = torch.rand(L, S, generator=gen) < 0.3
        association_mask[:, 0] = False  # every row keeps a stored pattern
        additive = hopfield_ref.additive_mask(association_mask=association_mask)
    elif mask == "float":
        association_mask = torch.randn(1, H, L, S, generator=gen, dtype=F64)
        additive = association_mask
    elif mask in ("padding", "one_key"):
        key_padding = torch.rand(B, S, generator=gen) < 0.3 if mask == "padding" else torch.ones(B, S, dtype=bool)
        key_padding[:, 0] = False
        additive = hopfield_ref.additive_mask(key_padding_mask=key_padding)
    # The stopping rule is a comparison: float32 rounding may stop a row at another step than float64 does, so
    # it is checked in float64 only.
    eps = 1e-3 if stop and dtype == F64 else None

    def fast(q, k, v, b):
        m = association_mask.to(q.dtype) if association_mask is not None and association_mask.is_floating_point() \
            else association_mask
        return hopfield_update(q, k, v, b, steps, mask=m, key_padding_mask=key_padding, eps=eps)

    def reference(q, k, v, b, rows=None, cols=None):
        """The reference loop, on the rows of q and the stored patterns in the orders given (the same result)."""
        m = None if additive is None else additive.to(q.dtype)
        if rows is not None:
            q = q[:, :, rows]
            m = m[..., rows, :] if m is not None and m.shape[-2] > 1 else m
        if cols is not None:
            k, v, m = k[:, :, cols], v[:, :, cols], None if m is None else m[..., cols]
        out = hopfield_ref.hopfield_update(q, k, v, b, steps, mask=m, eps=eps)[0]
        return out if rows is None else out[:, :, torch.argsort(rows)]

    # Up to four steps and a retrieval composed, their rounding errors heavy-tailed: the reference's own error is
    # also taken over three more orders of its sums (rows and stored patterns permuted).
    orders = [(torch.randperm(L, generator=gen), torch.randperm(S, generator=gen)) for _ in range(3)]
    variants = [lambda *t, o=o: reference(*t, *o) for o in orders]
    # beta in units of 1 / sqrt(d), the layers' default scale: up to 3 / sqrt(d) the softmaxes get sharp, not
    # saturated (where every gradient is rounding noise next to the terms it is the difference of)
    beta = torch.tensor(beta / math.sqrt(d), dtype=F64)
    by_rule(fast, reference, [q, k, v, beta], dtype, seed, differentiable=(0, 1, 2, 3), variants=variants)


@examples(20)
@given(lead_xi=st.lists(sizes(high=3), max_size=2), L=sizes(high=6), N=sizes(high=7), d=sizes(high=6),
       broadcast=st.booleans(), beta=st.floats(0.1, 4.0), beta_tensor=st.booleans(),
       dtype=st.sampled_from([F32, F64]), seed=seeds)
# Found by this property: outputs and beta's gradient of one or two numbers, where one draw of the reference's
# error was no yardstick (by_rule now takes FEW_DRAWS of it).
@example(lead_xi=[], L=2, N=2, d=1, broadcast=False, beta=0.1, beta_tensor=True, dtype=F32, seed=2460)
@example(lead_xi=[], L=1, N=2, d=1, broadcast=False, beta=0.115234375, beta_tensor=True, dtype=F32, seed=0)
def test_hopfield_energy(lead_xi, L, N, d, broadcast, beta, beta_tensor, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lead_X = [1 if broadcast else s for s in lead_xi]  # stored patterns shared across the leading dimensions
    xi = torch.randn(*lead_xi, L, d, generator=gen, dtype=F64)
    X = torch.randn(*lead_X, N, d, generator=gen, dtype=F64)
    inputs = [xi, X] + ([torch.tensor(beta, dtype=F64)] if beta_tensor else [])
    by_rule(lambda xi, X, *b: hopfield_energy(xi, X, b[0] if b else beta),
            lambda xi, X, *b: hopfield_ref.hopfield_energy(xi, X, b[0] if b else beta),
            inputs, dtype, seed, differentiable=range(len(inputs)))


# ---- pack_bits / unpack_bits (32 bits to a word; AVX2 packs 8 floats per compare) -------------------------------

PACK_K = (1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 97, 257)
SPECIAL = (0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45)


@examples(40)
@given(shape=st.lists(sizes(*PACK_K, high=5), min_size=1, max_size=3), dim=st.integers(-3, 2),
       dtype=st.sampled_from([F32, F64, BF16, F16]), specials=st.lists(st.sampled_from(SPECIAL), max_size=6),
       layout=st.sampled_from(LAYOUTS), seed=seeds)
def test_pack_bits_and_unpack_bits(shape, dim, dtype, specials, layout, seed):
    dim = dim % len(shape) - len(shape) if dim < 0 else dim % len(shape)
    gen = torch.Generator().manual_seed(seed)
    laid = arrange(shape, layout, gen)
    flat = laid.base.view(-1)
    for i, value in enumerate(specials):  # signed zeros, infinities, NaNs of both signs, the smallest subnormals
        flat[(i * 7919) % flat.numel()] = value
    x = laid(dtype)
    packed = pack_bits(x, dim)
    K = x.shape[dim]
    assert packed.dtype == torch.int32
    assert torch.equal(packed, binary_ref.pack_bits(x, dim)), "packed bits differ from the reference"
    # bit 1 exactly where x < 0 (so 0, -0.0 and NaN of either sign are +1)
    values = unpack_bits(packed, K, dim, dtype=F64)
    assert torch.equal(values, torch.where(x < 0, -1.0, 1.0).to(F64))


# ---- binary_matmul / binary_linear (register tiles of 2 x 3 rows, 64 rows of b per task, 8 words per AVX2 step,
# byte counters emptied every 31 steps = 7936 bits) --------------------------------------------------------------

BINARY_K = (1, 31, 32, 33, 63, 64, 65, 255, 256, 257, 511, 513, 7936, 7937, 7969)


@examples(40)
@given(lead=st.lists(sizes(high=2), max_size=1), M=sizes(2, 3, 5, 7, high=4), N=sizes(3, 4, 5, 64, 65, 67, high=6),
       K=sizes(*BINARY_K, high=40), output=st.sampled_from(["int", "float", "bits"]),
       scale=st.sampled_from([None, "vector", "number", "one"]), with_bias=st.booleans(),
       layouts=st.lists(st.sampled_from(LAYOUTS[:3]), min_size=2, max_size=2), seed=seeds)
def test_binary_matmul(lead, M, N, K, output, scale, with_bias, layouts, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, M, K, generator=gen)
    b = torch.randn(N, K, generator=gen)
    exact = binary_ref.binary_matmul(a.reshape(-1, K), b).reshape(*lead, M, N)  # float64, exact integers
    a_bits, b_bits = relaid(pack_bits(a), layouts[0]), relaid(pack_bits(b), layouts[1])
    if output == "int":
        got = binary_matmul(a_bits, b_bits, K)
        assert got.dtype == torch.int32 and torch.equal(got, exact.to(torch.int32))
        return
    s = {None: None, "vector": torch.rand(N, generator=gen) + 0.1, "number": 0.37, "one": torch.tensor([1.7])}[scale]
    bias = torch.randn(N, generator=gen) if with_bias else None
    got = binary_matmul(a_bits, b_bits, K, scale=s, bias=bias, output=output)
    # float32: the product of two roundings at most (scale, then bias), as the reference in float32 has
    s32 = 1.0 if s is None else (s if isinstance(s, float) else s.float())
    want32 = exact.float() * s32 + (0.0 if bias is None else bias)
    want64 = exact * (1.0 if s is None else (s if isinstance(s, float) else s.double())) + (
        0.0 if bias is None else bias.double())
    if output == "float":
        assert_by_rule(got, want32, want64, "binary_matmul float output")
    else:
        # signs of values that are not within float32 rounding of 0
        assert got.shape == (*lead, M, binary_ref.words(N))
        decided = want64.abs() > 1e-5 * want64.abs().amax().clamp_min(1)
        assert torch.equal(unpack_bits(got, N)[decided], binary_ref.sign(want64)[decided].float())


@examples(25)
@given(lead=st.lists(sizes(high=3), max_size=2), N=sizes(3, 64, 65, high=6), K=sizes(*BINARY_K[:11], high=40),
       dtype=st.sampled_from([F32, F64, BF16, F16]), with_bias=st.booleans(), layout=st.sampled_from(LAYOUTS),
       seed=seeds)
def test_binary_linear(lead, N, K, dtype, with_bias, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = arrange((*lead, K), layout, gen)(dtype)
    w = torch.randn(N, K, generator=gen)
    scale = binary_ref.channel_scale(w)  # XNOR-Net's per-channel alpha
    bias = torch.randn(N, generator=gen) if with_bias else None
    got = binary_linear(x, pack_bits(w), scale=scale, bias=bias)
    rows = x.reshape(-1, K)
    want64 = binary_ref.binary_matmul(rows, w, scale, bias).reshape(*lead, N)
    want32 = (binary_ref.binary_matmul(rows, w).float() * scale + (0.0 if bias is None else bias)).reshape(*lead, N)
    assert got.dtype == F32
    assert_by_rule(got, want32, want64, "binary_linear")


# ---- quantize / dequantize / fake_quantize (codes packed in blocks of 32 (8, 4 bits) or 64 (2 bits)) ---------------

@examples(30)
@given(N=sizes(high=5), K=sizes(31, 32, 33, 63, 64, 65, 127, 129, high=20), bits=st.sampled_from([8, 4, 2]),
       scheme=st.sampled_from(["symmetric", "minmax"]), groups=st.sampled_from([None, 1, 2, 3]),
       dtype=st.sampled_from([F32, F64, BF16]), transposed=st.booleans(), seed=seeds)
def test_quantize_dequantize_and_fake_quantize(N, K, bits, scheme, groups, dtype, transposed, seed):
    group_size = None if groups is None else groups * CODES_PER_BLOCK[bits]
    gen = torch.Generator().manual_seed(seed)
    w = arrange((N, K), "transposed" if transposed else "contiguous", gen)(dtype)
    qw = quantize(w, bits, group_size, scheme)
    codes = unpack_codes(qw)
    low, high = quant_ref.levels(bits, scheme)
    assert codes.shape == (N, qw.padded_features) and codes.min() >= low and codes.max() <= high
    padded = torch.cat([w, w[:, -1:].expand(-1, qw.padded_features - K)], 1)
    want_q, want_step, want_offset = quant_ref.quantize(padded, bits, qw.group_size, scheme)
    assert torch.equal(codes.double(), want_q), "codes differ from the reference's"
    torch.testing.assert_close(qw.step, want_step.float(), rtol=0, atol=0)
    torch.testing.assert_close(qw.offset, want_offset.float(), rtol=0, atol=0)
    # |w - w_hat| <= step / 2 per group, up to float32's rounding of step, offset and w_hat
    w_hat = dequantize(qw)
    assert w_hat.shape == (N, K) and w_hat.dtype == F32
    step = qw.step.double().repeat_interleave(qw.group_size, 1)[:, :K]
    offset = qw.offset.double().repeat_interleave(qw.group_size, 1)[:, :K]
    slack = 2.0 ** -23 * (codes[:, :K].abs() * step + offset.abs() + w_hat.double().abs())
    assert ((w_hat.double() - w.double()).abs() <= step / 2 + slack).all()
    # fake quantization: the reference's values with the steps and offsets as quantize() stores them (float32, or
    # x's dtype when wider), and the straight-through gradient
    if group_size is None or K % group_size == 0:
        x = w.detach().clone().requires_grad_()
        y = fake_quantize(x, bits, group_size, scheme)
        q, s, o = quant_ref.quantize(w, bits, group_size, scheme)
        kept = torch.promote_types(dtype, F32)
        assert torch.equal(y, quant_ref.dequantize(q, s.to(kept), o.to(kept)).to(dtype))
        g = torch.randn(y.shape, generator=gen).to(dtype)
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g)


# ---- quant_matmul (int8: tiles of 2 rows x 4 channels, 32 codes per step, 32 channels per task; int4: groups) ----

QUANT_K = (1, 31, 32, 33, 63, 64, 65, 100, 257)


@examples(30)
@given(lead=st.lists(sizes(high=2), max_size=1), M=sizes(2, 3, 5, high=4), N=sizes(4, 5, 31, 32, 33, 65, high=6),
       K=sizes(*QUANT_K, high=40), integer=st.booleans(), with_bias=st.booleans(), layout=st.sampled_from(LAYOUTS[:3]),
       seed=seeds)
def test_quant_matmul_int8(lead, M, N, K, integer, with_bias, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    if integer:
        # Integer values with 127 in every row: the steps are exactly 1 and the codes are the values, so the
        # output is the integer product itself (below 2^24: exact in float32).
        def integers(rows):
            t = torch.randint(-127, 128, (rows, K), generator=gen).float()
            t[torch.arange(rows), torch.randint(0, K, (rows,), generator=gen)] = 127.0
            return t
        x, w = integers(math.prod(lead) * M).reshape(*lead, M, K), integers(N)
        bias = torch.randint(-1000, 1000, (N,), generator=gen).float() if with_bias else None
        got = quant_matmul(relaid(x, layout), quantize(w, 8), bias)
        want = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert torch.equal(got, want.float()), "the int8 product is not exact"
        return
    x = torch.randn(*lead, M, K, generator=gen)
    w = torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen) if with_bias else None
    qweight = quantize(w, 8)
    got = quant_matmul(relaid(x, layout), qweight, bias)
    # the activations' codes as the op makes them (float32 steps, round half to even), the product in int64
    rows = x.reshape(-1, K)
    sx = rows.abs().amax(1) / 127.0
    qx = torch.round(rows / sx[:, None]).clamp(-127, 127).long()
    acc = qx @ unpack_codes(qweight)[:, :K].long().T
    want = (acc.double() * sx.double()[:, None] * qweight.step.double().T
            + (0 if bias is None else bias.double())).reshape(*lead, M, N)
    scale = want.abs().amax().clamp_min(1e-30)
    assert ((got.double() - want).abs() / scale).max() <= 4e-6


@examples(25)
@given(M=sizes(3, 4, 5, 9, high=6), N=sizes(31, 32, 33, high=5), K=sizes(31, 32, 33, 65, 129, 300, high=40),
       combo=st.sampled_from([(4, "minmax", 1), (4, "minmax", 2), (4, "minmax", 3), (4, "minmax", 4),
                              (4, "symmetric", 1), (2, "minmax", 1), (8, "minmax", 2), (8, "symmetric", 2)]),
       with_bias=st.booleans(), dtype=st.sampled_from([F32, BF16]), layout=st.sampled_from(LAYOUTS[:3]), seed=seeds)
# Found by this property: one output number, a sum of 300 products (see test_hopfield_energy's examples).
@example(M=1, N=1, K=300, combo=(4, "minmax", 1), with_bias=False, dtype=F32, layout="sliced", seed=1756113)
def test_quant_matmul_weight_only(M, N, K, combo, with_bias, dtype, layout, seed):
    bits, scheme, groups = combo
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    qw = quantize(w, bits, groups * CODES_PER_BLOCK[bits], scheme)
    # one group per row: the int8 product with quantized activations (test_quant_matmul_int8)
    assume(not (bits == 8 and scheme == "symmetric" and qw.step.shape[1] == 1))
    w_hat = dequantize(qw).double()
    x = arrange((M, K), layout, gen)
    bias = torch.randn(N, generator=gen, dtype=F64) if with_bias else None
    by_rule(lambda x, b: quant_matmul(x, qw, b),
            lambda x, b: x @ w_hat.to(x.dtype).T + (0 if b is None else b),
            [x, bias], dtype, seed)


# ---- quantize_to_points -------------------------------------------------------------------------------------------

@examples(40)
@given(shape=st.lists(sizes(7, 33, high=5), max_size=3), P=sizes(high=9), dtype=st.sampled_from([F32, F64, BF16]),
       duplicates=st.booleans(), ties=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds)
# Found by this property: a value on a rounded midpoint went to the farther point (the op searched the midpoints).
@example(shape=[7], P=2, dtype=F32, duplicates=False, ties=True, layout="contiguous", seed=1)
# Found by this property: a value above the largest of equal points gave its gradient to another of them than the
# reference (the first) does.
@example(shape=[], P=3, dtype=F32, duplicates=True, ties=False, layout="contiguous", seed=49014)
# Found by this property: past the largest point, where the distances round to a tie, the op took the largest point,
# the reference (the rule's "lower at a tie") the other.
@example(shape=[], P=2, dtype=BF16, duplicates=False, ties=False, layout="contiguous", seed=1762)
# Found by this property: two near points whose distances to a value round to a tie in bfloat16: the op compared
# only the two points around the value, the reference every rounded distance (distances are now exact).
@example(shape=[2, 33], P=3, dtype=BF16, duplicates=False, ties=False, layout="contiguous", seed=3350017)
def test_quantize_to_points(shape, P, dtype, duplicates, ties, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    points = (torch.randn(P, generator=gen, dtype=F64) * 2).to(dtype)  # unsorted, as while they are learned
    if duplicates and P > 1:
        points[-1] = points[0]
    base, view = arrange(shape, layout, gen, scale=2.0)
    base = base.to(dtype)
    flat = base.view(-1)
    if ties and P > 1 and flat.numel():
        # values exactly on points, and on the midpoints between neighbours as the dtype rounds them
        ordered = points.sort().values
        specials = torch.cat([ordered, (ordered[1:] + ordered[:-1]) / 2])
        n = min(flat.numel(), specials.numel())
        flat[:n] = specials[:n]
    x_leaf = base.clone().requires_grad_()
    p_leaf = points.clone().requires_grad_()
    got = quantize_to_points(view(x_leaf), p_leaf)
    ref_points = points.clone().requires_grad_()
    want = quant_ref.quantize_to_points(view(base), ref_points)
    assert got.dtype == dtype
    assert torch.equal(got, want), "a value went to another point than the nearest (lower at a tie)"
    grad = torch.randn(got.shape, generator=gen).to(dtype)
    gx, gp = torch.autograd.grad(got, [x_leaf, p_leaf], grad)
    assert torch.equal(gx, torch.autograd.grad(view(x_leaf), x_leaf, grad)[0])  # straight through
    # a point's gradient: the sum of its values' gradients, in the points' dtype, in some order
    (want_gp,) = torch.autograd.grad(want, ref_points, grad)
    rounding = 2 * torch.finfo(dtype).eps * grad.double().abs().sum().item() + 1e-30
    torch.testing.assert_close(gp.double(), want_gp.double(), rtol=0, atol=rounding)


# ---- rk_stage / rk_finalize (csrc/cpu/rk_*.cpp: spans of 512, 8 terms in registers, 8 lanes) -----------------------

RK_D = (7, 8, 9, 17, 511, 513)


def _coefficients(values, zeros):
    """A tableau row: the values, exactly 0 where ``zeros`` says (a stage the kernels skip)."""
    return [0.0 if z else c for c, z in zip(values, zeros)]


@examples(30)
@given(s=sizes(9, 10, high=7), B=sizes(7, 8, 9, high=4), D=sizes(*RK_D, high=9),
       a=st.lists(st.floats(0.01, 2).flatmap(lambda c: st.sampled_from([c, -c])), max_size=10),
       zeros=st.lists(st.booleans(), min_size=10, max_size=10),
       dtype=st.sampled_from([F32, F64]), layouts=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
       seed=seeds)
def test_rk_stage(s, B, D, a, zeros, dtype, layouts, seed):
    a = _coefficients(a[:s], zeros)
    gen = torch.Generator().manual_seed(seed)
    # (k expanded along the batch: equal stages make a row like (0, c, 0, -c) cancel to exactly 0, a value that a
    # relative error cannot judge and an FMA does not reproduce)
    y0, k, h = (arrange((B, D), layouts[0], gen), arrange((s, B, D), layouts[1], gen, broadcast=(1,)),
                arrange((B,), layouts[2], gen, scale=0.1))

    def reference(y0, k, h):
        return y0 + h[:, None] * ode_ref.combination(k, a)

    by_rule(lambda y0, k, h: rk_stage(y0, k, h, a), reference, [y0, k, h], dtype, seed, differentiable=(0, 1, 2))


@examples(30)
@given(s=sizes(7, 9, 10, low=2, high=4), B=sizes(7, 8, 9, high=4), D=sizes(*RK_D, high=9),
       b_err=st.lists(st.floats(0.01, 0.5).flatmap(lambda b: st.sampled_from([b, -b])), min_size=10, max_size=10),
       zeros=st.lists(st.booleans(), min_size=10, max_size=10), rtol=st.sampled_from([0.0, 1e-6, 1e-3, 1e-1]),
       atol=st.sampled_from([0.0, 1e-8, 1e-4]), dtype=st.sampled_from([F32, F64]),
       layouts=st.lists(st.sampled_from(LAYOUTS), min_size=5, max_size=5), seed=seeds)
# Found by this property: the backward summed the error stages twice, rounding them differently, so where their sum
# cancels the norm's gradient was 40 ulps off (csrc/cpu/rk_finalize.cpp).
@example(s=9, B=1, D=1, b_err=[-0.375, 0.25, 0.375, 0.5, 0.125, -0.25, 0.25, 0.5, 0.5, 0.5],
         zeros=[False, False, False, True, False, False, False, False, True, False], rtol=0.0, atol=0.0, dtype=F32,
         layouts=["contiguous"] * 5, seed=0)
# Exact-zero references: all error weights 0, so the error estimate and its norm are exactly 0 (the norm's
# gradient there is its subgradient 0).
@example(s=7, B=3, D=9, b_err=[0.25] * 10, zeros=[True] * 10, rtol=1e-3, atol=1e-8, dtype=F32,
         layouts=["transposed"] * 5, seed=2)
@example(s=2, B=1, D=17, b_err=[0.5] * 10, zeros=[True] * 10, rtol=0.0, atol=1e-4, dtype=F64,
         layouts=["contiguous"] * 5, seed=7)
def test_rk_finalize(s, B, D, b_err, zeros, rtol, atol, dtype, layouts, seed):
    b_err = _coefficients(b_err[:s], zeros)
    if rtol == 0 and atol == 0:
        atol = 1e-6
    gen = torch.Generator().manual_seed(seed)
    # k expanded along the batch only (equal stages cancel the error estimate to exactly 0, see test_rk_stage)
    parts = [arrange(shape, layout, gen, scale=scale, broadcast=(1,) if len(shape) == 3 else None)
             for shape, layout, scale in zip([(B, D), (B, D), (s, B, D), (B, D), (B,)], layouts, [1.0] * 4 + [0.05])]
    parts[4] = Laid(parts[4].base.abs() + 0.01, parts[4].view)  # step sizes > 0

    def fast(*leaves):
        return rk_finalize(*leaves, b_err, rtol, atol)

    def reference(y0, y1, k, g_prev, h):
        err = h[:, None] * ode_ref.combination(k, b_err)
        return ode_ref.error_norm(err, y0, y1, rtol, atol), ode_ref.stiffness(k, torch.stack([g_prev, y1]))

    by_rule(fast, reference, parts, dtype, seed, differentiable=range(5))


# ---- coverage -----------------------------------------------------------------------------------------------------

# Public ops with a property above, and those left to their own test files: QuantizedWeight (a dataclass), binarize
# (elementwise estimators), rk_accept and rk_begin (the solver's step control).
PROPERTIES = {
    "mixed_op": test_mixed_op, "batch_norm_mix": test_batch_norm_mix, "darts_pool_branches": test_darts_pool_branches,
    "depthwise_conv2d": test_depthwise_conv2d, "krylov_kernel": test_krylov_kernel, "causal_conv": test_causal_conv,
    "hopfield_update": test_hopfield_update, "hopfield_energy": test_hopfield_energy,
    "pack_bits": test_pack_bits_and_unpack_bits, "unpack_bits": test_pack_bits_and_unpack_bits,
    "binary_matmul": test_binary_matmul, "binary_linear": test_binary_linear,
    "quantize": test_quantize_dequantize_and_fake_quantize, "dequantize": test_quantize_dequantize_and_fake_quantize,
    "fake_quantize": test_quantize_dequantize_and_fake_quantize, "quant_matmul": test_quant_matmul_int8,
    "quantize_to_points": test_quantize_to_points, "rk_stage": test_rk_stage, "rk_finalize": test_rk_finalize,
}
NOT_HERE = {"QuantizedWeight", "binarize", "rk_accept", "rk_begin"}


def test_every_public_op_has_a_property():
    assert set(accel.ops.__all__) == set(PROPERTIES) | NOT_HERE
