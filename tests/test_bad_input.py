"""Bad input for every public op and module, as one table: wrong dtypes, devices (meta for one argument while the
others are on the CPU), ranks and sizes, empty tensors, NaN and Inf, and options out of range.

A row either raises a TypeError or ValueError whose message names the argument in backticks, as accel.ops._checks
writes them (a RuntimeError only where a value is at fault that a C++ kernel or the ODE solver finds as it runs), or
returns and its result is checked: the correct empty result, or the NaN propagated to where it belongs. A
RuntimeError from deep inside torch, an AttributeError or an IndexError fails a row: the op let the bad input through.
"""
import math
import re

import pytest
import torch
from torch import nn

import accel
from accel import _extension, ops
from accel.nn import (BinaryLinear, DepthwiseConv2d, Hopfield, HopfieldLayer, HopfieldPooling, LSSL, MixedOp,
                      NeuralODE, QuantLinear, darts)
from accel.ode import local_regularizer

NAN, INF = float("nan"), float("inf")
ERRORS = (TypeError, ValueError)
ROWS = []


def bad(id, call, arg, exc=ERRORS, match=None, marks=()):
    """call() raises exc, and its message names `arg` (or `arg[i]`), and matches ``match`` when given."""
    ROWS.append(pytest.param(call, (exc, arg, match), id=id, marks=marks))


# what only the C++ kernels check (a value, which the Python side cannot read without a host sync)
needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="the C++ extension is not loaded")


def ok(id, call, check):
    """call() returns, and check(result) holds."""
    ROWS.append(pytest.param(call, check, id=id))


@pytest.mark.parametrize("call, expect", ROWS)
def test_bad_input(call, expect):
    if callable(expect):
        result = call()
        verdict = expect(result)  # a check asserts, or returns whether it holds
        assert verdict is None or bool(verdict), result
        return
    exc, arg, match = expect
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.search(rf"`{re.escape(arg)}(\[\d+\])?`", message), f"`{arg}` is not named in: {message}"
    if match is not None:
        assert re.search(match, message), f"{match!r} not in: {message}"


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def meta(x):
    return x.to("meta")


def empty_like_shape(*shape, dtype=torch.float32):
    def check(out):
        assert tuple(out.shape) == shape and out.dtype == dtype
    return check


def nan_at(index, only=True):
    """The output is NaN at ``index`` (and, with only, finite everywhere else)."""
    def check(out):
        assert out[index].isnan().all(), out
        if only:
            rest = with_value(out.detach(), index, 0.0)
            assert rest.isfinite().all(), out
    return check


# --- mixed_op -------------------------------------------------------------------------------------------------------
def ys3(shape=(4, 5), dtype=torch.float32):
    return [r(*shape, dtype=dtype) for _ in range(3)]


def mix(ys=None, weights="default", **kw):
    ys = ys3() if ys is None else ys
    weights = torch.rand(3) + 0.1 if isinstance(weights, str) else weights
    return ops.mixed_op(ys, weights, **kw) if "alpha" not in kw else ops.mixed_op(ys, **kw)


bad("mixed_op-ys-wrong-dtype", lambda: mix([y.int() for y in ys3()]), "ys", TypeError)
bad("mixed_op-ys-mixed-dtype", lambda: mix(ys3()[:2] + [r(4, 5, dtype=torch.float64)]), "ys", TypeError)
bad("mixed_op-ys-not-tensor", lambda: mix([[1.0, 2.0]] * 3), "ys", TypeError)
bad("mixed_op-ys-one-on-meta", lambda: mix(ys3()[:2] + [meta(r(4, 5))]), "ys")
bad("mixed_op-ys-mismatched-shape", lambda: mix(ys3()[:2] + [r(4, 6)]), "ys")
bad("mixed_op-ys-empty-list", lambda: mix([], torch.rand(0)), "ys")
bad("mixed_op-ys-0-dim-tensor", lambda: mix(torch.tensor(1.0)), "ys")
bad("mixed_op-weights-wrong-dtype", lambda: mix(weights=torch.ones(3, dtype=torch.int32)), "weights", TypeError)
bad("mixed_op-weights-on-meta", lambda: mix(weights=meta(torch.rand(3))), "weights")
bad("mixed_op-weights-wrong-rank", lambda: mix(weights=torch.rand(3, 1)), "weights")
bad("mixed_op-weights-wrong-size", lambda: mix(weights=torch.rand(2)), "weights")
bad("mixed_op-weights-not-tensor", lambda: mix(weights=[0.2, 0.3, 0.5]), "weights", TypeError)
bad("mixed_op-weights-and-alpha", lambda: ops.mixed_op(ys3(), torch.rand(3), alpha=torch.rand(3)), "weights")
bad("mixed_op-no-weights", lambda: ops.mixed_op(ys3()), "weights")
bad("mixed_op-stacked-ys-wrong-K", lambda: mix(r(2, 4, 5)), "weights")
bad("mixed_op-alpha-wrong-dtype", lambda: mix(alpha=torch.ones(3, dtype=torch.long)), "alpha", TypeError)
for _name, _tau in (("nan", NAN), ("zero", 0.0), ("string", "1")):
    bad(f"mixed_op-tau-{_name}", lambda tau=_tau: mix(alpha=torch.rand(3), tau=tau), "tau")
ok("mixed_op-empty-rows", lambda: mix(ys3((0, 5))), empty_like_shape(0, 5))
ok("mixed_op-empty-columns", lambda: mix(ys3((4, 0)), alpha=torch.rand(3)), empty_like_shape(4, 0))
ok("mixed_op-nan-in-ys", lambda: mix(ys3()[:1] + [with_value(r(4, 5), (1, 2), NAN)] + ys3()[:1]), nan_at((1, 2)))
ok("mixed_op-nan-in-weights", lambda: mix(weights=torch.tensor([0.5, NAN, 0.5])), lambda out: out.isnan().all())
ok("mixed_op-inf-in-alpha", lambda: mix(alpha=torch.tensor([INF, 0.0, 0.0])), lambda out: out.isnan().all())


# --- batch_norm_mix -------------------------------------------------------------------------------------------------
def norms(K=2, C=3, **kw):
    return [nn.BatchNorm2d(C, affine=False, **kw) for _ in range(K)]


def zs2(shape=(2, 3, 4, 4), dtype=torch.float32):
    return [r(*shape, dtype=dtype) for _ in range(2)]


def bnmix(zs=None, weights=None, bns=None, eval=False):
    bns = norms() if bns is None else bns
    if eval:
        for bn in bns:
            bn.eval()
    return ops.batch_norm_mix(zs2() if zs is None else zs, torch.rand(2) if weights is None else weights, bns)


bad("batch_norm_mix-zs-wrong-dtype", lambda: bnmix([z.int() for z in zs2()]), "zs", TypeError)
bad("batch_norm_mix-zs-mixed-dtype", lambda: bnmix([r(2, 3, 4, 4), r(2, 3, 4, 4, dtype=torch.float64)]), "zs",
    TypeError)
bad("batch_norm_mix-zs-one-on-meta", lambda: bnmix([r(2, 3, 4, 4), meta(r(2, 3, 4, 4))]), "zs")
bad("batch_norm_mix-zs-wrong-rank", lambda: bnmix([r(3), r(3)]), "zs")
bad("batch_norm_mix-zs-mismatched-shape", lambda: bnmix([r(2, 3, 4, 4), r(2, 3, 4, 5)]), "zs")
bad("batch_norm_mix-zs-empty-list", lambda: bnmix([], torch.rand(0), []), "zs")
bad("batch_norm_mix-zs-one-value-per-channel", lambda: bnmix(zs2((1, 3, 1, 1))), "zs")
bad("batch_norm_mix-zs-empty-batch-training", lambda: bnmix(zs2((0, 3, 4, 4))), "zs")
bad("batch_norm_mix-weights-wrong-dtype", lambda: bnmix(weights=torch.ones(2, dtype=torch.int64)), "weights")
bad("batch_norm_mix-weights-wrong-size", lambda: bnmix(weights=torch.rand(3)), "weights")
bad("batch_norm_mix-weights-on-meta", lambda: bnmix(weights=meta(torch.rand(2))), "weights")
bad("batch_norm_mix-norms-wrong-count", lambda: bnmix(bns=norms(K=3)), "norms")
bad("batch_norm_mix-norms-affine", lambda: bnmix(bns=[nn.BatchNorm2d(3), nn.BatchNorm2d(3)]), "norms")
bad("batch_norm_mix-norms-wrong-channels", lambda: bnmix(bns=norms(K=1) + norms(K=1, C=4)), "norms")
bad("batch_norm_mix-norms-not-batchnorm", lambda: bnmix(bns=[nn.Identity(), nn.Identity()]), "norms")
bad("batch_norm_mix-norms-mixed-modes", lambda: bnmix(bns=[norms(K=1)[0], norms(K=1)[0].eval()]), "norms")
bad("batch_norm_mix-norms-on-meta", lambda: bnmix(bns=[bn.to("meta") for bn in norms()]), "norms")
bad("batch_norm_mix-norms-negative-eps", lambda: bnmix(bns=norms(eps=-1.0)), "norms")
bad("batch_norm_mix-norms-nan-momentum", lambda: bnmix(bns=norms(momentum=NAN)), "norms")
ok("batch_norm_mix-empty-batch-eval", lambda: bnmix(zs2((0, 3, 4, 4)), eval=True), empty_like_shape(0, 3, 4, 4))
ok("batch_norm_mix-empty-spatial-eval", lambda: bnmix(zs2((2, 3, 0, 4)), eval=True), empty_like_shape(2, 3, 0, 4))
ok("batch_norm_mix-nan-in-zs-training", lambda: bnmix([with_value(r(2, 3, 4, 4), (0, 1, 0, 0), NAN), r(2, 3, 4, 4)]),
   nan_at((slice(None), 1)))
ok("batch_norm_mix-nan-in-zs-eval",
   lambda: bnmix([with_value(r(2, 3, 4, 4), (0, 1, 2, 3), NAN), r(2, 3, 4, 4)], eval=True), nan_at((0, 1, 2, 3)))


# --- darts_pool_branches --------------------------------------------------------------------------------------------
def pools(x=None, weights=None, max_bn=None, avg_bn=None, eval=False):
    max_bn, avg_bn = max_bn or norms(K=1)[0], avg_bn or norms(K=1)[0]
    if eval:
        max_bn.eval(), avg_bn.eval()
    return ops.darts_pool_branches(r(2, 3, 5, 5) if x is None else x, torch.rand(2) if weights is None else weights,
                                   max_bn, avg_bn)


bad("darts_pool_branches-x-float64", lambda: pools(r(2, 3, 5, 5, dtype=torch.float64)), "x")
bad("darts_pool_branches-x-int", lambda: pools(r(2, 3, 5, 5).int()), "x")
bad("darts_pool_branches-x-wrong-rank", lambda: pools(r(3, 5, 5)), "x")
bad("darts_pool_branches-x-on-meta", lambda: pools(meta(r(2, 3, 5, 5))), "weights")
bad("darts_pool_branches-x-one-value-per-channel", lambda: pools(r(1, 3, 1, 1)), "x")
bad("darts_pool_branches-weights-wrong-size", lambda: pools(weights=torch.rand(3)), "weights")
bad("darts_pool_branches-weights-int", lambda: pools(weights=torch.ones(2, dtype=torch.int32)), "weights")
bad("darts_pool_branches-weights-on-meta", lambda: pools(weights=meta(torch.rand(2))), "weights")
bad("darts_pool_branches-max_bn-wrong-channels", lambda: pools(max_bn=nn.BatchNorm2d(4, affine=False)), "max_bn")
bad("darts_pool_branches-avg_bn-affine", lambda: pools(avg_bn=nn.BatchNorm2d(3)), "avg_bn")
bad("darts_pool_branches-max_bn-not-batchnorm", lambda: pools(max_bn=nn.Identity()), "max_bn")
bad("darts_pool_branches-bns-mixed-modes", lambda: pools(avg_bn=norms(K=1)[0].eval()), "max_bn")
bad("darts_pool_branches-avg_bn-on-meta", lambda: pools(avg_bn=norms(K=1)[0].to("meta")), "avg_bn")
bad("darts_pool_branches-bns-negative-eps", lambda: pools(max_bn=norms(K=1, eps=-1.0)[0],
                                                          avg_bn=norms(K=1, eps=-1.0)[0]), "max_bn")
ok("darts_pool_branches-empty-batch-eval", lambda: pools(r(0, 3, 5, 5), eval=True), empty_like_shape(0, 3, 5, 5))
ok("darts_pool_branches-nan-in-x-eval", lambda: pools(with_value(r(2, 3, 5, 5), (1, 2, 0, 0), NAN), eval=True),
   nan_at((1, 2, slice(0, 2), slice(0, 2))))
ok("darts_pool_branches-nan-in-x-training", lambda: pools(with_value(r(2, 3, 5, 5), (1, 2, 0, 0), NAN)),
   nan_at((slice(None), 2)))


# --- depthwise_conv2d -----------------------------------------------------------------------------------------------
def dw(x=None, weight=None, **kw):
    return ops.depthwise_conv2d(r(1, 2, 5, 5) if x is None else x, r(2, 1, 3, 3) if weight is None else weight, **kw)


bad("depthwise_conv2d-x-int", lambda: dw(r(1, 2, 5, 5).int(), r(2, 1, 3, 3).int()), "x", TypeError)
bad("depthwise_conv2d-weight-other-dtype", lambda: dw(weight=r(2, 1, 3, 3, dtype=torch.float64)), "weight", TypeError)
bad("depthwise_conv2d-x-wrong-rank", lambda: dw(r(2, 5, 5)), "x")
bad("depthwise_conv2d-x-not-tensor", lambda: dw(x=1.0), "x")
bad("depthwise_conv2d-weight-wrong-rank", lambda: dw(weight=r(2, 3, 3)), "weight")
bad("depthwise_conv2d-weight-wrong-channels", lambda: dw(weight=r(3, 1, 3, 3)), "weight")
bad("depthwise_conv2d-x-wrong-channels", lambda: dw(x=r(1, 3, 5, 5)), "x")
bad("depthwise_conv2d-weight-not-depthwise", lambda: dw(weight=r(2, 2, 3, 3)), "weight")
bad("depthwise_conv2d-weight-on-meta", lambda: dw(weight=meta(r(2, 1, 3, 3))), "weight")
bad("depthwise_conv2d-x-on-meta", lambda: dw(x=meta(r(1, 2, 5, 5))), "weight")
bad("depthwise_conv2d-kernel-larger-than-input", lambda: dw(weight=r(2, 1, 7, 7)), "weight")
bad("depthwise_conv2d-empty-kernel", lambda: dw(weight=r(2, 1, 0, 3)), "weight")
for _arg, _value in (("stride", 0), ("stride", (1, 2, 3)), ("stride", 1.5), ("padding", -1), ("dilation", (2, 0))):
    bad(f"depthwise_conv2d-{_arg}-{_value}", lambda a=_arg, v=_value: dw(**{a: v}), _arg)
ok("depthwise_conv2d-empty-batch", lambda: dw(r(0, 2, 5, 5)), empty_like_shape(0, 2, 3, 3))
bad("depthwise_conv2d-empty-channels", lambda: dw(r(1, 0, 5, 5), r(0, 1, 3, 3)), "x")
ok("depthwise_conv2d-nan-in-x", lambda: dw(with_value(r(1, 2, 5, 5), (0, 1, 0, 0), NAN)), nan_at((0, 1, 0, 0)))
ok("depthwise_conv2d-inf-in-weight", lambda: dw(weight=with_value(r(2, 1, 3, 3), (0, 0, 1, 1), INF)),
   lambda out: (~out[:, 0].isfinite()).all() and out[:, 1].isfinite().all())


# --- krylov_kernel --------------------------------------------------------------------------------------------------
def kry(dA=None, dB=None, C=None, L=4):
    return ops.krylov_kernel(r(2, 3, 3) / 3 if dA is None else dA, r(2, 3) if dB is None else dB,
                             r(2, 1, 3) if C is None else C, L)


bad("krylov_kernel-dA-int", lambda: kry(dA=r(2, 3, 3).int()), "dA", TypeError)
bad("krylov_kernel-dB-other-dtype", lambda: kry(dB=r(2, 3, dtype=torch.float64)), "dB")
bad("krylov_kernel-C-bfloat16", lambda: kry(C=r(2, 1, 3).bfloat16()), "C", TypeError)
bad("krylov_kernel-C-on-meta", lambda: kry(C=meta(r(2, 1, 3))), "C")
bad("krylov_kernel-dA-on-meta", lambda: kry(dA=meta(r(2, 3, 3))), "dB")
bad("krylov_kernel-dA-wrong-rank", lambda: kry(dA=r(3, 3)), "dA")
bad("krylov_kernel-dA-not-square", lambda: kry(dA=r(2, 3, 4)), "dA")
bad("krylov_kernel-dB-wrong-H", lambda: kry(dB=r(3, 3)), "dB")
bad("krylov_kernel-C-wrong-N", lambda: kry(C=r(2, 1, 4)), "C")
bad("krylov_kernel-C-wrong-H", lambda: kry(C=r(1, 1, 3)), "C")
for _L in (0, 2.0, True):
    bad(f"krylov_kernel-L-{_L}", lambda L=_L: kry(L=L), "L")
ok("krylov_kernel-empty-features", lambda: kry(r(0, 3, 3), r(0, 3), r(0, 1, 3)), empty_like_shape(0, 1, 4))
ok("krylov_kernel-empty-channels", lambda: kry(C=r(2, 0, 3)), empty_like_shape(2, 0, 4))
ok("krylov_kernel-empty-state", lambda: kry(r(2, 0, 0), r(2, 0), r(2, 1, 0)),
   lambda out: out.shape == (2, 1, 4) and (out == 0).all())
ok("krylov_kernel-nan-in-dA", lambda: kry(dA=with_value(r(2, 3, 3) / 3, (0, 0, 0), NAN)),
   lambda out: out[0, :, 1:].isnan().all() and out[0, :, 0].isfinite().all() and out[1].isfinite().all())
ok("krylov_kernel-nan-in-dB", lambda: kry(dB=with_value(r(2, 3), (1, 0), NAN)), nan_at(1))


# --- causal_conv ----------------------------------------------------------------------------------------------------
def conv(u=None, K=None, D="default", activation=None, K_reverse=None):
    return ops.causal_conv(r(1, 6, 2) if u is None else u, r(2, 1, 4) if K is None else K,
                           r(2, 1) if isinstance(D, str) else D, activation, K_reverse)


bad("causal_conv-u-int", lambda: conv(u=r(1, 6, 2).int()), "u", TypeError)
bad("causal_conv-K-other-dtype", lambda: conv(K=r(2, 1, 4, dtype=torch.float64)), "K", TypeError)
bad("causal_conv-D-other-dtype", lambda: conv(D=r(2, 1, dtype=torch.float64)), "D", TypeError)
bad("causal_conv-K_reverse-int", lambda: conv(K_reverse=r(2, 1, 4).int()), "K_reverse", TypeError)
bad("causal_conv-K-on-meta", lambda: conv(K=meta(r(2, 1, 4))), "K")
bad("causal_conv-D-on-meta", lambda: conv(D=meta(r(2, 1))), "D")
bad("causal_conv-K_reverse-on-meta", lambda: conv(K_reverse=meta(r(2, 1, 4))), "K_reverse")
bad("causal_conv-u-on-meta", lambda: conv(u=meta(r(1, 6, 2))), "K")
bad("causal_conv-u-not-tensor", lambda: conv(u=[1.0]), "u", TypeError)
bad("causal_conv-u-wrong-rank", lambda: conv(u=r(6, 2)), "u")
bad("causal_conv-K-wrong-rank", lambda: conv(K=r(2, 4)), "K")
bad("causal_conv-K-wrong-H", lambda: conv(K=r(3, 1, 4)), "K")
bad("causal_conv-K-longer-than-u", lambda: conv(K=r(2, 1, 7)), "K")
bad("causal_conv-D-wrong-shape", lambda: conv(D=r(2, 2)), "D")
bad("causal_conv-K_reverse-wrong-channels", lambda: conv(K_reverse=r(2, 2, 4)), "K_reverse")
bad("causal_conv-K_reverse-longer-than-u", lambda: conv(K_reverse=r(2, 1, 7)), "K_reverse")
for _act in ("relu", 1):
    bad(f"causal_conv-activation-{_act}", lambda a=_act: conv(activation=a), "activation")
ok("causal_conv-empty-batch", lambda: conv(u=r(0, 6, 2)), empty_like_shape(0, 6, 2, 1))
ok("causal_conv-empty-sequence", lambda: conv(u=r(1, 0, 2), K=r(2, 1, 0)), empty_like_shape(1, 0, 2, 1))
ok("causal_conv-empty-features", lambda: conv(u=r(1, 6, 0), K=r(0, 1, 4), D=r(0, 1)), empty_like_shape(1, 6, 0, 1))
bad("causal_conv-empty-kernel", lambda: conv(K=r(2, 1, 0)), "K")
bad("causal_conv-empty-reverse-kernel", lambda: conv(K_reverse=r(2, 1, 0)), "K_reverse")
ok("causal_conv-nan-in-u", lambda: conv(u=with_value(r(1, 6, 2), (0, 3, 1), NAN)),
   lambda out: out[0, 3, 1].isnan().all() and out[0, :, 0].isfinite().all())
ok("causal_conv-inf-in-K", lambda: conv(K=with_value(r(2, 1, 4), (0, 0, 0), INF), activation="gelu"),
   lambda out: (~out[0, :, 0].isfinite()).all() and out[0, :, 1].isfinite().all())


# --- hopfield_update ------------------------------------------------------------------------------------------------
def hop(q=None, k=None, v=None, beta=0.5, steps=1, **kw):
    return ops.hopfield_update(r(1, 2, 3, 4) if q is None else q, r(1, 2, 5, 4) if k is None else k,
                               r(1, 2, 5, 3) if v is None else v, beta, steps, **kw)


bad("hopfield_update-q-wrong-dtype", lambda: hop(q=r(1, 2, 3, 4).int()), "q", TypeError)
bad("hopfield_update-k-other-dtype", lambda: hop(k=r(1, 2, 5, 4, dtype=torch.float64)), "k", TypeError)
bad("hopfield_update-v-wrong-dtype", lambda: hop(v=r(1, 2, 5, 3).long()), "v", TypeError)
bad("hopfield_update-k-on-meta", lambda: hop(k=meta(r(1, 2, 5, 4))), "k")
bad("hopfield_update-v-on-meta", lambda: hop(v=meta(r(1, 2, 5, 3))), "v")
bad("hopfield_update-q-on-meta", lambda: hop(q=meta(r(1, 2, 3, 4))), "k")
bad("hopfield_update-beta-on-meta", lambda: hop(beta=meta(torch.tensor(0.5))), "beta")
bad("hopfield_update-q-not-tensor", lambda: hop(q=[1.0]), "q", TypeError)
bad("hopfield_update-q-wrong-rank", lambda: hop(q=r(2, 3, 4)), "q")
bad("hopfield_update-k-wrong-width", lambda: hop(k=r(1, 2, 5, 3)), "k")
bad("hopfield_update-k-wrong-heads", lambda: hop(k=r(1, 3, 5, 4)), "k")
bad("hopfield_update-k-wrong-batch", lambda: hop(q=r(2, 2, 3, 4), k=r(3, 2, 5, 4)), "k")
bad("hopfield_update-v-wrong-length", lambda: hop(v=r(1, 2, 6, 3)), "v")
bad("hopfield_update-k-no-stored-patterns", lambda: hop(k=r(1, 2, 0, 4), v=r(1, 2, 0, 3)), "k")
for _steps in (-1, 1.5):
    bad(f"hopfield_update-steps-{_steps}", lambda s=_steps: hop(steps=s), "steps")
for _eps in (-1e-3, NAN):
    bad(f"hopfield_update-eps-{_eps}", lambda e=_eps: hop(eps=e), "eps")
for _beta in (NAN, INF, "1"):
    bad(f"hopfield_update-beta-{_beta}", lambda b=_beta: hop(beta=b), "beta")
bad("hopfield_update-beta-not-scalar", lambda: hop(beta=torch.ones(2)), "beta")
bad("hopfield_update-mask-wrong-shape", lambda: hop(mask=torch.zeros(3, 4, dtype=torch.bool)), "mask")
bad("hopfield_update-mask-wrong-dtype", lambda: hop(mask=torch.zeros(3, 5, dtype=torch.int32)), "mask", TypeError)
bad("hopfield_update-mask-on-meta", lambda: hop(mask=meta(torch.zeros(3, 5, dtype=torch.bool))), "mask")
bad("hopfield_update-mask-with-energy", lambda: hop(mask=torch.zeros(3, 5), return_energy=True), "mask")
bad("hopfield_update-key_padding_mask-wrong-shape", lambda: hop(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)),
    "key_padding_mask")
bad("hopfield_update-key_padding_mask-float", lambda: hop(key_padding_mask=torch.zeros(1, 5)), "key_padding_mask")
bad("hopfield_update-key_padding_mask-on-meta",
    lambda: hop(key_padding_mask=meta(torch.zeros(1, 5, dtype=torch.bool))), "key_padding_mask")
ok("hopfield_update-empty-rows", lambda: hop(q=r(1, 2, 0, 4)), empty_like_shape(1, 2, 0, 3))
ok("hopfield_update-empty-batch", lambda: hop(q=r(0, 2, 3, 4), k=r(0, 2, 5, 4), v=r(0, 2, 5, 3)),
   empty_like_shape(0, 2, 3, 3))
ok("hopfield_update-empty-values", lambda: hop(v=r(1, 2, 5, 0)), empty_like_shape(1, 2, 3, 0))
# with no width every logit is 0: the retrieval is the mean of the values
ok("hopfield_update-empty-width",
   lambda: hop(q=r(1, 2, 3, 0), k=r(1, 2, 5, 0), v=torch.arange(10.0).reshape(1, 2, 5, 1)),
   lambda out: torch.equal(out, torch.tensor([2.0, 7.0]).reshape(1, 2, 1, 1).expand(1, 2, 3, 1)))
ok("hopfield_update-nan-in-q", lambda: hop(q=with_value(r(1, 2, 3, 4), (0, 1, 2, 0), NAN)), nan_at((0, 1, 2)))
ok("hopfield_update-nan-in-k", lambda: hop(k=with_value(r(1, 2, 5, 4), (0, 0, 1, 0), NAN)), nan_at((0, 0)))
ok("hopfield_update-nan-beta-tensor", lambda: hop(beta=torch.tensor(NAN)), lambda out: out.isnan().all())
ok("hopfield_update-nan-in-v", lambda: hop(v=with_value(r(1, 2, 5, 3), (0, 1, 4, 2), NAN), steps=0),
   nan_at((0, 1, slice(None), 2)))


# --- hopfield_energy ------------------------------------------------------------------------------------------------
def energy(xi=None, X=None, beta=1.0):
    return ops.hopfield_energy(r(2, 3, 4) if xi is None else xi, r(2, 5, 4) if X is None else X, beta)


bad("hopfield_energy-xi-int", lambda: energy(xi=r(2, 3, 4).int()), "xi")
bad("hopfield_energy-X-int", lambda: energy(X=r(2, 5, 4).int()), "X")
bad("hopfield_energy-X-other-dtype", lambda: energy(X=r(2, 5, 4, dtype=torch.float64)), "X", TypeError)
bad("hopfield_energy-X-on-meta", lambda: energy(X=meta(r(2, 5, 4))), "X")
bad("hopfield_energy-xi-on-meta", lambda: energy(xi=meta(r(2, 3, 4))), "X")
bad("hopfield_energy-xi-not-tensor", lambda: energy(xi=[1.0]), "xi", TypeError)
bad("hopfield_energy-xi-wrong-rank", lambda: energy(xi=r(4)), "xi")
bad("hopfield_energy-X-wrong-width", lambda: energy(X=r(2, 5, 3)), "X")
bad("hopfield_energy-X-batch-does-not-broadcast", lambda: energy(X=r(3, 5, 4)), "X")
bad("hopfield_energy-X-no-patterns", lambda: energy(X=r(2, 0, 4)), "X")
for _beta in (0.0, NAN, "1"):
    bad(f"hopfield_energy-beta-{_beta}", lambda b=_beta: energy(beta=b), "beta")
ok("hopfield_energy-empty-rows", lambda: energy(xi=r(2, 0, 4)), empty_like_shape(2, 0))
ok("hopfield_energy-nan-in-xi", lambda: energy(xi=with_value(r(2, 3, 4), (1, 2, 3), NAN)), nan_at((1, 2)))
ok("hopfield_energy-inf-in-X", lambda: energy(X=with_value(r(2, 5, 4), (0, 1, 1), INF)),
   lambda out: (~out[0].isfinite()).all() and out[1].isfinite().all())


# --- pack_bits, unpack_bits -----------------------------------------------------------------------------------------
bad("pack_bits-x-int", lambda: ops.pack_bits(torch.ones(3, 40, dtype=torch.int32)), "x", TypeError)
bad("pack_bits-x-not-tensor", lambda: ops.pack_bits([1.0, -1.0]), "x", TypeError)
bad("pack_bits-x-0-dim", lambda: ops.pack_bits(torch.tensor(1.0)), "x")
for _dim in (2, 1.0):
    bad(f"pack_bits-dim-{_dim}", lambda d=_dim: ops.pack_bits(r(3, 40), dim=d), "dim")
ok("pack_bits-empty-K", lambda: ops.pack_bits(r(3, 0)), empty_like_shape(3, 0, dtype=torch.int32))
ok("pack_bits-empty-rows", lambda: ops.pack_bits(r(0, 40)), empty_like_shape(0, 2, dtype=torch.int32))
# pack_bits documents NaN as +1 (bit 0), the sign binarize gives it too; +-inf keep their signs
ok("pack_bits-nan-and-inf", lambda: ops.unpack_bits(ops.pack_bits(torch.tensor([[NAN, -INF, INF, -NAN]])), 4),
   lambda out: torch.equal(out, torch.tensor([[1.0, -1.0, 1.0, 1.0]])))


def packed(*shape):
    return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32)


bad("unpack_bits-packed-float", lambda: ops.unpack_bits(r(3, 2), 40), "packed", TypeError)
bad("unpack_bits-packed-int64", lambda: ops.unpack_bits(packed(3, 2).long(), 40), "packed", TypeError)
bad("unpack_bits-packed-0-dim", lambda: ops.unpack_bits(torch.tensor(1, dtype=torch.int32), 1), "packed")
for _k in (65, -1, 40.0):
    bad(f"unpack_bits-k-{_k}", lambda k=_k: ops.unpack_bits(packed(3, 2), k), "k")
for _dim in (2, 0.5):
    bad(f"unpack_bits-dim-{_dim}", lambda d=_dim: ops.unpack_bits(packed(3, 2), 2, dim=d), "dim")
bad("unpack_bits-dtype-string", lambda: ops.unpack_bits(packed(3, 2), 40, dtype="float32"), "dtype", TypeError)
ok("unpack_bits-empty-rows", lambda: ops.unpack_bits(packed(0, 2), 40), empty_like_shape(0, 40))
ok("unpack_bits-k-zero", lambda: ops.unpack_bits(packed(3, 2), 0), empty_like_shape(3, 0))


# --- binary_matmul, binary_linear -----------------------------------------------------------------------------------
def bmm(a=None, b=None, k=40, **kw):
    return ops.binary_matmul(packed(3, 2) if a is None else a, packed(4, 2) if b is None else b, k, **kw)


bad("binary_matmul-a_bits-float", lambda: bmm(a=r(3, 2)), "a_bits", TypeError)
bad("binary_matmul-b_bits-int64", lambda: bmm(b=packed(4, 2).long()), "b_bits", TypeError)
bad("binary_matmul-b_bits-on-meta", lambda: bmm(b=meta(packed(4, 2))), "b_bits")
bad("binary_matmul-a_bits-on-meta", lambda: bmm(a=meta(packed(3, 2))), "b_bits")
bad("binary_matmul-a_bits-0-dim", lambda: bmm(a=torch.tensor(1, dtype=torch.int32)), "a_bits")
bad("binary_matmul-b_bits-wrong-rank", lambda: bmm(b=packed(2)), "b_bits")
bad("binary_matmul-words-mismatch", lambda: bmm(b=packed(4, 3)), "b_bits")
for _k in (70, 0, 40.0):
    bad(f"binary_matmul-k-{_k}", lambda k=_k: bmm(k=k), "k")
bad("binary_matmul-output-unknown", lambda: bmm(output="float64"), "output")
bad("binary_matmul-output-int-with-scale", lambda: bmm(scale=2.0, output="int"), "output")
bad("binary_matmul-scale-wrong-shape", lambda: bmm(scale=torch.ones(3)), "scale")
bad("binary_matmul-scale-int", lambda: bmm(scale=torch.ones(4, dtype=torch.int32)), "scale", TypeError)
bad("binary_matmul-scale-on-meta", lambda: bmm(scale=meta(torch.ones(4))), "scale")
bad("binary_matmul-bias-wrong-shape", lambda: bmm(bias=torch.ones(4, 1)), "bias")
bad("binary_matmul-bias-number", lambda: bmm(bias=1.0), "bias", TypeError)
bad("binary_matmul-bias-on-meta", lambda: bmm(bias=meta(torch.ones(4))), "bias")
ok("binary_matmul-empty-rows", lambda: bmm(a=packed(0, 2)), empty_like_shape(0, 4, dtype=torch.int32))
ok("binary_matmul-empty-columns", lambda: bmm(b=packed(0, 2), output="float"), empty_like_shape(3, 0))
ok("binary_matmul-empty-K", lambda: bmm(packed(3, 0), packed(4, 0), 0),
   lambda out: out.shape == (3, 4) and (out == 0).all())
ok("binary_matmul-nan-scale", lambda: bmm(scale=torch.tensor([1.0, NAN, 1.0, 1.0])), nan_at((slice(None), 1)))
ok("binary_matmul-inf-bias", lambda: bmm(bias=torch.tensor([0.0, 0.0, -INF, 0.0])),
   lambda out: (out[:, 2] == -INF).all() and out[:, [0, 1, 3]].isfinite().all())


def blin(x=None, w_bits=None, k=None, **kw):
    return ops.binary_linear(r(3, 40) if x is None else x, packed(4, 2) if w_bits is None else w_bits, k, **kw)


bad("binary_linear-x-int", lambda: blin(x=r(3, 40).int()), "x", TypeError)
bad("binary_linear-x-not-tensor", lambda: blin(x=[1.0]), "x", TypeError)
bad("binary_linear-x-wrong-features", lambda: blin(x=r(3, 40), k=33), "x")
bad("binary_linear-x-0-dim", lambda: blin(x=torch.tensor(1.0)), "x")
bad("binary_linear-w_bits-float", lambda: blin(w_bits=r(4, 2)), "w_bits", TypeError)
bad("binary_linear-w_bits-wrong-words", lambda: blin(w_bits=packed(4, 3)), "w_bits")
bad("binary_linear-w_bits-wrong-rank", lambda: blin(w_bits=packed(8)), "w_bits")
bad("binary_linear-w_bits-on-meta", lambda: blin(w_bits=meta(packed(4, 2))), "w_bits")
bad("binary_linear-x-on-meta", lambda: blin(x=meta(r(3, 40))), "w_bits")
bad("binary_linear-scale-wrong-shape", lambda: blin(scale=torch.ones(5)), "scale")
ok("binary_linear-empty-rows", lambda: blin(x=r(0, 40)), empty_like_shape(0, 4))
ok("binary_linear-nan-in-x-is-plus-one",
   lambda: (blin(x=with_value(torch.full((1, 40), -1.0), (0, 5), NAN), w_bits=ops.pack_bits(torch.ones(4, 40))),),
   lambda out: torch.equal(out[0], torch.full((1, 4), -38.0)))


# --- binarize -------------------------------------------------------------------------------------------------------
bad("binarize-x-int", lambda: ops.binarize(torch.ones(3, dtype=torch.int32)), "x", TypeError)
bad("binarize-x-not-tensor", lambda: ops.binarize([1.0]), "x", TypeError)
bad("binarize-estimator-unknown", lambda: ops.binarize(r(3), "sign"), "estimator")
for _name, _value in (("o", 0.5), ("o", "2"), ("t", 0.0), ("t", INF), ("delta", NAN), ("delta", 2.0)):
    bad(f"binarize-{_name}-{_value}", lambda n=_name, v=_value: ops.binarize(r(3), **{n: v}), _name)
ok("binarize-empty", lambda: ops.binarize(r(0, 3)), empty_like_shape(0, 3))
# NaN binarizes to +1 as pack_bits has it, so that training (binarize) and packed inference agree
ok("binarize-nan-and-inf", lambda: ops.binarize(torch.tensor([NAN, -INF, INF])),
   lambda out: torch.equal(out, torch.tensor([1.0, -1.0, 1.0])))


# --- quantize, dequantize, fake_quantize ----------------------------------------------------------------------------
bad("quantize-w-int", lambda: ops.quantize(torch.ones(4, 32, dtype=torch.int32)), "w")
bad("quantize-w-wrong-rank", lambda: ops.quantize(r(32)), "w")
bad("quantize-w-not-tensor", lambda: ops.quantize([[1.0]]), "w")
bad("quantize-w-no-features", lambda: ops.quantize(r(4, 0)), "w")
for _bits in (3, "8", 8.0):
    bad(f"quantize-bits-{_bits}", lambda b=_bits: ops.quantize(r(4, 32), b), "bits")
bad("quantize-scheme-unknown", lambda: ops.quantize(r(4, 32), 8, None, "asymmetric"), "scheme")
for _group in (0, 33, 32.0):
    bad(f"quantize-group_size-{_group}", lambda g=_group: ops.quantize(r(4, 32), 4, g), "group_size")
bad("quantize-group_size-not-a-block-of-2-bits", lambda: ops.quantize(r(4, 64), 2, 32), "group_size")
ok("quantize-empty-rows", lambda: ops.dequantize(ops.quantize(r(0, 32), 4, 32, "minmax")), empty_like_shape(0, 32))
ok("quantize-nan-in-w", lambda: ops.dequantize(ops.quantize(with_value(r(2, 64), (1, 40), NAN), 8, 32)),
   nan_at((1, slice(32, 64))))
ok("quantize-inf-in-w-minmax", lambda: ops.dequantize(ops.quantize(with_value(r(2, 32), (0, 3), INF), 4, 32, "minmax")),
   lambda out: (~out[0].isfinite()).any() and out[1].isfinite().all())


def qw(bits=8, group_size=None, scheme="symmetric", N=4, K=32):
    return ops.quantize(r(N, K), bits, group_size, scheme)


def broken(**fields):
    w = qw(4, 32, "minmax")
    return ops.QuantizedWeight(**{**w.__dict__, **fields})


bad("dequantize-qw-tensor", lambda: ops.dequantize(r(4, 32)), "qw", TypeError)
bad("dequantize-qw-codes-float", lambda: ops.dequantize(broken(codes=r(4, 16))), "qw")
bad("dequantize-qw-step-wrong-rows", lambda: ops.dequantize(broken(step=torch.ones(3, 1))), "qw")
bad("dequantize-qw-offset-on-meta", lambda: ops.dequantize(broken(offset=meta(torch.ones(4, 1)))), "qw")
bad("dequantize-qw-bits-unknown", lambda: ops.dequantize(broken(bits=3)), "qw")


def fq(x=None, bits=8, group_size=None, scheme="symmetric", gradient="straight_through"):
    return ops.fake_quantize(r(3, 32) if x is None else x, bits, group_size, scheme, gradient)


bad("fake_quantize-x-int", lambda: fq(torch.ones(3, 32, dtype=torch.int32)), "x", TypeError)
bad("fake_quantize-x-not-tensor", lambda: fq([[1.0]]), "x", TypeError)
bad("fake_quantize-x-0-dim", lambda: fq(torch.tensor(1.0)), "x")
bad("fake_quantize-x-no-features", lambda: fq(r(3, 0)), "x")
bad("fake_quantize-x-not-whole-groups", lambda: fq(r(3, 40), 4, 32), "x")
bad("fake_quantize-bits-3", lambda: fq(bits=3), "bits")
bad("fake_quantize-scheme-unknown", lambda: fq(scheme="absmax"), "scheme")
bad("fake_quantize-group_size-33", lambda: fq(bits=4, group_size=33), "group_size")
bad("fake_quantize-gradient-unknown", lambda: fq(gradient="truncated"), "gradient")
ok("fake_quantize-empty-rows", lambda: fq(r(0, 32)), empty_like_shape(0, 32))
ok("fake_quantize-nan-in-x", lambda: fq(with_value(r(3, 64), (2, 1), NAN), 4, 32, "minmax"), nan_at((2, slice(0, 32))))


# --- quantize_to_points ---------------------------------------------------------------------------------------------
def qtp(x=None, points=None):
    return ops.quantize_to_points(r(3, 4) if x is None else x, torch.linspace(-1, 1, 5) if points is None else points)


bad("quantize_to_points-x-int", lambda: qtp(x=torch.ones(3, dtype=torch.int32)), "x", TypeError)
bad("quantize_to_points-x-not-tensor", lambda: qtp(x=[1.0]), "x", TypeError)
bad("quantize_to_points-points-not-tensor", lambda: qtp(points=[0.0, 1.0]), "points", TypeError)
bad("quantize_to_points-points-other-dtype", lambda: qtp(points=torch.linspace(-1, 1, 5, dtype=torch.float64)),
    "points", TypeError)
bad("quantize_to_points-points-int", lambda: qtp(points=torch.arange(5)), "points", TypeError)
bad("quantize_to_points-points-on-meta", lambda: qtp(points=meta(torch.linspace(-1, 1, 5))), "points")
bad("quantize_to_points-x-on-meta", lambda: qtp(x=meta(r(3, 4))), "points")
bad("quantize_to_points-points-wrong-rank", lambda: qtp(points=torch.linspace(-1, 1, 6).reshape(2, 3)), "points")
bad("quantize_to_points-points-empty", lambda: qtp(points=torch.zeros(0)), "points")
ok("quantize_to_points-empty-x", lambda: qtp(x=r(0, 4)), empty_like_shape(0, 4))
ok("quantize_to_points-nan-in-x", lambda: qtp(x=with_value(r(3, 4), (1, 1), NAN)), nan_at((1, 1)))
ok("quantize_to_points-inf-in-x", lambda: qtp(x=torch.tensor([-INF, INF])),
   lambda out: torch.equal(out, torch.tensor([-1.0, 1.0])))


# --- quant_matmul ---------------------------------------------------------------------------------------------------
def qmm(x=None, qweight=None, bias=None):
    return ops.quant_matmul(r(3, 32) if x is None else x, qw() if qweight is None else qweight, bias)


bad("quant_matmul-qweight-tensor", lambda: qmm(qweight=r(4, 32)), "qweight", TypeError)
bad("quant_matmul-qweight-step-on-meta", lambda: qmm(qweight=broken(step=meta(torch.ones(4, 1)))), "qweight")
bad("quant_matmul-qweight-codes-wrong-dtype", lambda: qmm(qweight=broken(codes=torch.ones(4, 16))), "qweight")
bad("quant_matmul-x-int", lambda: qmm(x=torch.ones(3, 32, dtype=torch.int32)), "x", TypeError)
bad("quant_matmul-x-not-tensor", lambda: qmm(x=[1.0]), "x", TypeError)
bad("quant_matmul-x-wrong-features", lambda: qmm(x=r(3, 33)), "x")
bad("quant_matmul-x-0-dim", lambda: qmm(x=torch.tensor(1.0)), "x")
bad("quant_matmul-x-on-meta", lambda: qmm(x=meta(r(3, 32))), "x")
bad("quant_matmul-bias-wrong-shape", lambda: qmm(bias=torch.ones(5)), "bias")
bad("quant_matmul-bias-int", lambda: qmm(bias=torch.ones(4, dtype=torch.int32)), "bias", TypeError)
bad("quant_matmul-bias-on-meta", lambda: qmm(bias=meta(torch.ones(4))), "bias")
for _bits, _group, _scheme in ((8, None, "symmetric"), (4, 32, "minmax"), (2, 64, "minmax")):
    ok(f"quant_matmul-empty-rows-{_bits}-bits", lambda b=_bits, g=_group, s=_scheme: qmm(r(0, 64), qw(b, g, s, K=64)),
       empty_like_shape(0, 4))
    ok(f"quant_matmul-nan-in-x-{_bits}-bits",
       lambda b=_bits, g=_group, s=_scheme: qmm(with_value(r(3, 64), (1, 7), NAN), qw(b, g, s, K=64)),
       nan_at(1))


# --- rk_stage, rk_finalize, rk_begin, rk_accept ---------------------------------------------------------------------
def stage(y0=None, k=None, h=None, a=(0.5,)):
    return ops.rk_stage(r(2, 3) if y0 is None else y0, r(4, 2, 3) if k is None else k,
                        torch.full((2,), 0.1) if h is None else h, list(a) if isinstance(a, tuple) else a)


bad("rk_stage-y0-int", lambda: stage(y0=r(2, 3).int()), "y0", TypeError)
bad("rk_stage-k-other-dtype", lambda: stage(k=r(4, 2, 3, dtype=torch.float64)), "k", TypeError)
bad("rk_stage-h-float16", lambda: stage(h=torch.full((2,), 0.1).half()), "h", TypeError)
bad("rk_stage-k-on-meta", lambda: stage(k=meta(r(4, 2, 3))), "k")
bad("rk_stage-h-on-meta", lambda: stage(h=meta(torch.ones(2))), "h")
bad("rk_stage-y0-on-meta", lambda: stage(y0=meta(r(2, 3))), "k")
bad("rk_stage-y0-wrong-rank", lambda: stage(y0=r(6)), "y0")
bad("rk_stage-k-wrong-batch", lambda: stage(k=r(4, 3, 3)), "k")
bad("rk_stage-h-wrong-shape", lambda: stage(h=torch.ones(2, 1)), "h")
bad("rk_stage-a-not-list", lambda: stage(a=0.5), "a", TypeError)
bad("rk_stage-a-too-long", lambda: stage(a=[0.1] * 5), "a")
bad("rk_stage-a-not-numbers", lambda: stage(a=["0.5"]), "a", TypeError)
bad("rk_stage-a-tensor", lambda: stage(a=torch.ones(1)), "a", TypeError)
ok("rk_stage-empty-batch", lambda: stage(r(0, 3), r(4, 0, 3), torch.ones(0)), empty_like_shape(0, 3))
ok("rk_stage-empty-state", lambda: stage(r(2, 0), r(4, 2, 0)), empty_like_shape(2, 0))
ok("rk_stage-no-stages", lambda: stage(y0=torch.ones(2, 3), k=r(0, 2, 3), a=[]), lambda out: (out == 1).all())
ok("rk_stage-nan-in-k", lambda: stage(k=with_value(r(4, 2, 3), (0, 1, 2), NAN)), nan_at((1, 2)))
ok("rk_stage-nan-in-h", lambda: stage(h=torch.tensor([0.1, NAN])), nan_at(1))
ok("rk_stage-nan-coefficient", lambda: stage(a=[NAN]), lambda out: out.isnan().all())
# a stage whose coefficient is 0 is not read (documented), so its NaN does not reach g
ok("rk_stage-nan-in-unused-stage", lambda: stage(k=with_value(r(4, 2, 3), 1, NAN), a=[0.5, 0.0]),
   lambda out: out.isfinite().all())


def fin(y0=None, y1=None, k=None, g_prev=None, h=None, b_err=(0.1, -0.2, 0.1), rtol=1e-3, atol=1e-6):
    return ops.rk_finalize(r(2, 3) if y0 is None else y0, r(2, 3) if y1 is None else y1,
                           r(3, 2, 3) if k is None else k, r(2, 3) if g_prev is None else g_prev,
                           torch.full((2,), 0.1) if h is None else h,
                           list(b_err) if isinstance(b_err, tuple) else b_err, rtol, atol)


_SHAPES = {"y0": (2, 3), "y1": (2, 3), "k": (3, 2, 3), "g_prev": (2, 3), "h": (2,)}
for _arg in ("y0", "k", "h"):
    bad(f"rk_finalize-{_arg}-int", lambda a=_arg: fin(**{a: r(*_SHAPES[a]).int()}), _arg, TypeError)
for _arg in ("y1", "g_prev", "h"):
    bad(f"rk_finalize-{_arg}-on-meta", lambda a=_arg: fin(**{a: meta(r(*_SHAPES[a]))}), _arg)
for _arg in ("y1", "k", "g_prev", "h"):
    bad(f"rk_finalize-{_arg}-wrong-shape", lambda a=_arg: fin(**{a: r(*_SHAPES[a][:-1], 4)}), _arg)
bad("rk_finalize-g_prev-not-tensor", lambda: fin(g_prev=0.5), "g_prev", TypeError)
bad("rk_finalize-y0-wrong-rank", lambda: fin(y0=r(6)), "y0")
bad("rk_finalize-k-one-stage", lambda: fin(k=r(1, 2, 3), b_err=[0.1]), "k")
bad("rk_finalize-b_err-wrong-length", lambda: fin(b_err=[0.1, -0.1]), "b_err")
bad("rk_finalize-b_err-not-list", lambda: fin(b_err=0.1), "b_err")
for _name, _value in (("rtol", -1e-3), ("rtol", NAN), ("atol", INF), ("atol", torch.tensor(1e-6))):
    bad(f"rk_finalize-{_name}-{_value}", lambda n=_name, v=_value: fin(**{n: v}), _name)
bad("rk_finalize-tolerances-both-zero", lambda: fin(rtol=0.0, atol=0.0), "rtol")
ok("rk_finalize-empty-batch", lambda: fin(r(0, 3), r(0, 3), r(3, 0, 3), r(0, 3), torch.ones(0))[0],
   empty_like_shape(0))
# the error norm, which decides acceptance, is NaN, and so is the stiffness estimate (0 only where its denominator
# is exactly 0, as accel.reference.ode.stiffness defines it)
ok("rk_finalize-nan-in-y1", lambda: fin(y1=with_value(r(2, 3), (1, 0), NAN)),
   lambda out: out[0][1].isnan() and out[0][0].isfinite() and out[1][1].isnan() and out[1][0].isfinite())
ok("rk_finalize-nan-in-k", lambda: fin(k=with_value(r(3, 2, 3), (2, 0, 1), NAN))[0], nan_at(0))


def begin(t=None, h=None, next_index=None, times=None, c=(0.0, 0.5, 1.0), clip=True):
    return ops.rk_begin(torch.zeros(2) if t is None else t, torch.full((2,), 0.1) if h is None else h,
                        torch.ones(2, dtype=torch.long) if next_index is None else next_index,
                        torch.linspace(0, 1, 3) if times is None else times, c, clip)


bad("rk_begin-t-int", lambda: begin(t=torch.zeros(2, dtype=torch.int32)), "t", TypeError)
bad("rk_begin-h-other-dtype", lambda: begin(h=torch.ones(2, dtype=torch.float64)), "h", TypeError)
bad("rk_begin-times-other-dtype", lambda: begin(times=torch.linspace(0, 1, 3, dtype=torch.float64)), "times", TypeError)
bad("rk_begin-next_index-int32", lambda: begin(next_index=torch.ones(2, dtype=torch.int32)), "next_index", TypeError)
bad("rk_begin-h-on-meta", lambda: begin(h=meta(torch.ones(2))), "h")
bad("rk_begin-times-on-meta", lambda: begin(times=meta(torch.linspace(0, 1, 3))), "times")
bad("rk_begin-t-wrong-rank", lambda: begin(t=torch.zeros(2, 1)), "t")
bad("rk_begin-h-wrong-size", lambda: begin(h=torch.ones(3)), "h")
bad("rk_begin-next_index-wrong-size", lambda: begin(next_index=torch.ones(3, dtype=torch.long)), "next_index")
bad("rk_begin-t-not-tensor", lambda: begin(t=0.0), "t", TypeError)
bad("rk_begin-c-not-numbers", lambda: begin(c=["0.5"]), "c", TypeError)
# the CPU kernel indexes times and out by next_index: a negative row must be refused, not read or written
bad("rk_begin-next_index-negative", lambda: begin(next_index=torch.tensor([1, -1])), "next_index", RuntimeError,
    marks=needs_cpp)
ok("rk_begin-empty-batch",
   lambda: begin(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)),
   lambda out: out[0].shape == (0,) and out[1].shape == (3, 0))
ok("rk_begin-nan-in-h", lambda: begin(h=torch.tensor([0.1, NAN]))[0], nan_at(1))


def accept_args(B=2, D=3, s=3, T=3):
    """rk_accept's arguments for a step of 0.1 from t = 0 with output times (0, 0.5, 1)."""
    return dict(y=r(B, D), k=r(s, B, D), t=torch.zeros(B), h=torch.full((B,), 0.1),
                next_index=torch.ones(B, dtype=torch.long), previous=torch.zeros(B), out=torch.zeros(T, B, D),
                y1=r(B, D), norm=torch.full((B,), 0.5), step=torch.full((B,), 0.1), times=torch.linspace(0, 1, T),
                safety=0.9, order=5, pi=False, fsal=True, interpolant=None)


def accept(**changes):
    args = accept_args()
    args.update(changes)
    return ops.rk_accept(**args)


def accept_shape(name):
    return tuple(accept_args()[name].shape)


for _arg in ("y", "k", "norm", "times"):
    bad(f"rk_accept-{_arg}-other-dtype", lambda a=_arg: accept(**{a: r(*accept_shape(a), dtype=torch.float64)}),
        _arg, TypeError)
for _arg in ("k", "t", "out", "y1", "step"):
    bad(f"rk_accept-{_arg}-on-meta", lambda a=_arg: accept(**{a: meta(r(*accept_shape(a)))}), _arg)
for _arg in ("y", "h", "previous", "norm", "y1"):
    bad(f"rk_accept-{_arg}-wrong-shape", lambda a=_arg: accept(**{a: r(*accept_shape(a), 1)}), _arg)
bad("rk_accept-y-not-tensor", lambda: accept(y=1.0), "y", TypeError)
bad("rk_accept-h-non-contiguous", lambda: accept(h=torch.ones(2, 2)[:, 0]), "h")
bad("rk_accept-out-too-few-rows", lambda: accept(out=torch.zeros(2, 2, 3)), "out")
bad("rk_accept-k-no-stages", lambda: accept(k=r(0, 2, 3)), "k")
bad("rk_accept-next_index-negative", lambda: accept(next_index=torch.tensor([-5, 1])), "next_index", RuntimeError,
    marks=needs_cpp)
bad("rk_accept-next_index-int32", lambda: accept(next_index=torch.ones(2, dtype=torch.int32)), "next_index", TypeError)
bad("rk_accept-next_index-on-meta", lambda: accept(next_index=meta(torch.ones(2, dtype=torch.long))), "next_index")
for _name, _value in (("safety", 0.0), ("safety", NAN), ("order", 0), ("order", 2.5)):
    bad(f"rk_accept-{_name}-{_value}", lambda n=_name, v=_value: accept(**{n: v}), _name)
bad("rk_accept-interpolant-wrong-rows", lambda: accept(interpolant=[[1.0, 0.0]] * 2), "interpolant")
bad("rk_accept-interpolant-ragged", lambda: accept(interpolant=[[1.0, 0.0], [1.0], [0.0, 1.0]]), "interpolant")


def accept_nan_norm():
    args = accept_args()
    args["norm"] = torch.tensor([0.5, NAN])
    status, unfinished = ops.rk_accept(**args)
    return status, args["h"]


# a NaN error norm rejects the step and shrinks it by the most allowed
ok("rk_accept-nan-norm-rejects", accept_nan_norm,
   lambda out: out[0].tolist() == [1, 0] and math.isclose(out[1][1].item(), 0.02, rel_tol=1e-6))


# --- odeint, local_regularizer --------------------------------------------------------------------------------------
def decay(t, y):
    return -y


TIMES = torch.tensor([0.0, 0.5, 1.0])


def solve(func=decay, y0=None, t=None, **kw):
    return accel.odeint(func, torch.ones(2, 3) if y0 is None else y0, TIMES if t is None else t, **kw)


def solve_per_sample(func=decay, y0=None, t=None, **options):
    return accel.odeint(func, torch.ones(2, 3) if y0 is None else y0, TIMES if t is None else t, options=options,
                        per_sample=True)


bad("odeint-func-not-callable", lambda: solve(func=1.0), "func", TypeError)
bad("odeint-func-wrong-shape", lambda: solve(func=lambda t, y: y[:, :2]), "func")
bad("odeint-func-returns-a-tuple", lambda: solve(func=lambda t, y: (y, y)), "func")
bad("odeint-tuple-func-wrong-shape", lambda: solve(func=lambda t, y: (y[0], y[1][:1]), y0=(torch.ones(2), torch.ones(3))),
    "func")
bad("odeint-y0-int", lambda: solve(y0=torch.ones(2, 3, dtype=torch.int32)), "y0", TypeError)
bad("odeint-y0-list", lambda: solve(y0=[1.0, 2.0]), "y0", TypeError)
bad("odeint-y0-tuple-mixed-dtypes", lambda: solve(y0=(torch.ones(2), torch.ones(2, dtype=torch.float64))), "y0",
    TypeError)
bad("odeint-y0-on-meta", lambda: solve(y0=meta(torch.ones(2, 3))), "y0")
bad("odeint-t-on-meta", lambda: solve(t=meta(TIMES)), "t")
bad("odeint-t-wrong-rank", lambda: solve(t=TIMES[None]), "t")
bad("odeint-t-empty", lambda: solve(t=torch.zeros(0)), "t")
bad("odeint-t-not-monotone", lambda: solve(t=torch.tensor([0.0, 1.0, 0.5])), "t")
bad("odeint-t-nan", lambda: solve(t=torch.tensor([0.0, NAN, 1.0])), "t")
bad("odeint-t-inf", lambda: solve(t=torch.tensor([0.0, 1.0, INF])), "t")
bad("odeint-t-int", lambda: solve(t=torch.tensor([0, 1])), "t")
bad("odeint-method-unknown", lambda: solve(method="dopri8"), "method")
for _name, _value in (("rtol", -1e-6), ("rtol", NAN), ("rtol", None), ("atol", INF), ("atol", torch.ones(2))):
    bad(f"odeint-{_name}-{_value}", lambda n=_name, v=_value: solve(**{n: v}), _name)
bad("odeint-tolerances-both-zero", lambda: solve(rtol=0.0, atol=0.0), "atol")
bad("odeint-options-not-a-dict", lambda: solve(options=[("step_size", 0.1)]), "options", TypeError)
bad("odeint-options-unknown", lambda: solve(options={"controller": "PI"}), "options")
bad("odeint-options-of-fixed-steps-for-dopri5", lambda: solve(options={"step_size": 0.1}), "options")
for _name, _value in (("safety", NAN), ("safety", "0.9"), ("first_step", 0.0), ("first_step", -1.0),
                      ("min_step", -1.0), ("max_num_steps", 0), ("max_num_steps", 10.5)):
    bad(f"odeint-options-{_name}-{_value}", lambda n=_name, v=_value: solve(options={n: v}),
        f"options['{_name}']")
bad("odeint-options-step_size-negative", lambda: solve(method="rk4", options={"step_size": -0.1}),
    "options['step_size']")
bad("odeint-options-interp-unknown", lambda: solve(method="rk4", options={"interp": "spline"}), "options['interp']")
bad("odeint-regularization-without-per_sample", lambda: solve(regularization="error"), "regularization")
bad("odeint-max_num_steps-reached", lambda: solve(t=torch.tensor([0.0, 100.0]), options={"max_num_steps": 2}),
    "max_num_steps", RuntimeError)
ok("odeint-one-time", lambda: solve(t=TIMES[:1]), lambda out: torch.equal(out, torch.ones(1, 2, 3)))
ok("odeint-empty-state", lambda: solve(y0=torch.ones(2, 0)), empty_like_shape(3, 2, 0))
# a NaN state rejects every step, each shrinking the next: the solver stops with an error once the step underflows
bad("odeint-nan-in-y0", lambda: solve(y0=with_value(torch.ones(2, 3), (1, 2), NAN)), "func", RuntimeError,
    match="NaN")
bad("odeint-nan-from-func", lambda: solve(func=lambda t, y: y * (NAN if t > 0.2 else 1.0)), "func", RuntimeError)
# with fixed steps there is no error estimate to reject them: the NaN comes out in the solution
ok("odeint-rk4-nan-in-y0", lambda: solve(y0=with_value(torch.ones(2, 3), (1, 2), NAN), method="rk4",
                                         options={"step_size": 0.25}), nan_at((slice(None), 1, 2)))

bad("odeint-per_sample-y0-without-batch", lambda: solve_per_sample(y0=torch.tensor(1.0)), "y0")
bad("odeint-per_sample-t-of-another-batch", lambda: solve_per_sample(t=torch.zeros(3, 5)), "t")
bad("odeint-per_sample-t-wrong-rank", lambda: solve_per_sample(t=torch.zeros(3, 2, 1)), "t")
bad("odeint-per_sample-controller-unknown", lambda: solve_per_sample(controller="PID"), "controller")
bad("odeint-per_sample-options-unknown", lambda: solve_per_sample(jump_t=torch.tensor([0.5])), "options")
for _name, _value in (("safety", 1.5), ("safety", NAN), ("safety", "0.9"), ("first_step", 0.0), ("first_step", NAN),
                      ("step_size", -0.1), ("min_step", -1.0), ("min_step", INF), ("max_num_steps", 0),
                      ("max_num_steps", 10.5), ("check_every", 0)):
    bad(f"odeint-per_sample-{_name}-{_value}", lambda n=_name, v=_value: solve_per_sample(**{n: v}), _name)
for _kind, _method in (("kinetic", "dopri5"), ("error", "rk4"), ("stiffness", "bosh3")):
    bad(f"odeint-per_sample-regularization-{_kind}-{_method}",
        lambda k=_kind, m=_method: accel.odeint(decay, torch.ones(2, 3), TIMES, method=m, per_sample=True,
                                                regularization=k), "regularization")
bad("odeint-per_sample-params-missing", lambda: solve_per_sample(y0=torch.ones(2, 3, requires_grad=True)),
    "options['params']")
bad("odeint-per_sample-params-not-tensors", lambda: solve_per_sample(params=[1.0]), "options['params']", TypeError)
ok("odeint-per_sample-empty-batch", lambda: solve_per_sample(y0=torch.ones(0, 3)), empty_like_shape(3, 0, 3))
bad("odeint-per_sample-empty-state", lambda: solve_per_sample(y0=torch.ones(2, 0)), "y0")
bad("odeint-per_sample-nan-in-y0", lambda: solve_per_sample(y0=with_value(torch.ones(2, 3), (1, 2), NAN)), "y0",
    RuntimeError, match="sample 1")
bad("odeint-per_sample-inf-in-y0", lambda: solve_per_sample(y0=with_value(torch.ones(2, 3), (0, 0), INF),
                                                            first_step=0.1), "y0", RuntimeError, match="sample 0")
bad("odeint-per_sample-nan-from-func",
    lambda: solve_per_sample(func=lambda t, y: y * torch.where(t > 0.2, NAN, 1.0)), "func", RuntimeError)
bad("odeint_adjoint-closure-without-adjoint_params", lambda: accel.odeint_adjoint(decay, torch.ones(2), TIMES),
    "func")
bad("odeint_event-t0-not-a-tensor", lambda: accel.odeint_event(decay, torch.ones(2), 0.0, event_fn=decay), "t0",
    TypeError)
bad("odeint-event_fn-not-callable", lambda: solve(event_fn=1.0), "event_fn", TypeError)


def local(func=decay, t=None, y=None, **kw):
    return local_regularizer(func, torch.zeros(2) if t is None else t, torch.ones(2, 3) if y is None else y, **kw)


bad("local_regularizer-func-not-callable", lambda: local(func=None), "func", TypeError)
bad("local_regularizer-method-rk4", lambda: local(method="rk4"), "method")
bad("local_regularizer-kind-unknown", lambda: local(kind="kinetic"), "kind")
bad("local_regularizer-stiffness-with-bosh3", lambda: local(method="bosh3", kind="stiffness"), "kind")
bad("local_regularizer-y-wrong-rank", lambda: local(y=torch.ones(3)), "y")
bad("local_regularizer-y-int", lambda: local(y=torch.ones(2, 3, dtype=torch.int32)), "y")
bad("local_regularizer-t-wrong-shape", lambda: local(t=torch.zeros(3)), "t")
bad("local_regularizer-t-not-tensor", lambda: local(t=0.0), "t")
bad("local_regularizer-t-on-meta", lambda: local(t=meta(torch.zeros(2))), "t")
bad("local_regularizer-h-wrong-shape", lambda: local(h=torch.ones(3)), "h")
bad("local_regularizer-h-on-meta", lambda: local(h=meta(torch.ones(2))), "h")
for _name, _value in (("rtol", NAN), ("atol", -1.0)):
    bad(f"local_regularizer-{_name}-{_value}", lambda n=_name, v=_value: local(**{n: v}), _name)
ok("local_regularizer-nan-in-y", lambda: local(y=with_value(torch.ones(2, 3), (1, 0), NAN), h=torch.full((2,), 0.1)),
   lambda out: out[1].isnan() and out[0].isfinite())


# --- accel.quantize_ ------------------------------------------------------------------------------------------------
def model():
    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))


bad("quantize_-model-not-module", lambda: accel.quantize_(r(4, 4)), "model", TypeError)
bad("quantize_-model-a-bare-linear", lambda: accel.quantize_(nn.Linear(4, 4)), "model", TypeError)
for _bits in (3, "4"):
    bad(f"quantize_-bits-{_bits}", lambda b=_bits: accel.quantize_(model(), b), "bits")
bad("quantize_-group_size-33", lambda: accel.quantize_(model(), 4, 33), "group_size")
bad("quantize_-filter_fn-not-callable", lambda: accel.quantize_(model(), 8, filter_fn="Linear"), "filter_fn", TypeError)
bad("quantize_-auto-without-budget", lambda: accel.quantize_(model(), "auto", calibration=lambda m: 0), "budget")
bad("quantize_-auto-negative-budget",
    lambda: accel.quantize_(model(), "auto", budget=-1.0, calibration=lambda m: 0), "budget")
bad("quantize_-auto-zero-probes",
    lambda: accel.quantize_(model(), "auto", budget=4.0, calibration=lambda m: 0, probes=0), "probes")


# --- modules: constructors ------------------------------------------------------------------------------------------
for _row in [
    ("MixedOp-C-zero", lambda: MixedOp(0, 1), "C"),
    ("MixedOp-stride-3", lambda: MixedOp(4, 3), "stride"),
    ("MixedOp-partial_channels-not-dividing", lambda: MixedOp(4, 1, partial_channels=3), "partial_channels"),
    ("MixedOp-primitives-unknown", lambda: MixedOp(4, 1, primitives=["conv_9x9"]), "primitives"),
    ("MixedOp-primitives-only-none", lambda: MixedOp(4, 1, primitives=["none"]), "primitives"),
    ("Cell-steps-zero", lambda: darts.Cell(0, 1, 4, 4, 4, False, False), "steps"),
    ("Cell-multiplier-too-large", lambda: darts.Cell(2, 5, 4, 4, 4, False, False), "multiplier"),
    ("Cell-C-zero", lambda: darts.Cell(2, 2, 4, 4, 0, False, False), "C"),
    ("Network-weighting-unknown", lambda: darts.Network(4, 10, 1, None, 1, 1, weighting="hard"), "weighting"),
    ("Network-tau-zero", lambda: darts.Network(4, 10, 1, None, 1, 1, tau=0.0), "tau"),
    ("Network-layers-zero", lambda: darts.Network(4, 10, 0, None, 1, 1), "layers"),
    ("Network-criterion-not-callable", lambda: darts.Network(4, 10, 1, 4), "criterion"),
    ("Network-num_classes-zero", lambda: darts.Network(4, 0, 1, None, 1, 1), "num_classes"),
    ("Network-partial_channels-not-dividing", lambda: darts.Network(4, 10, 1, None, 1, 1, partial_channels=3),
     "partial_channels"),
    ("DepthwiseConv2d-channels-zero", lambda: DepthwiseConv2d(0, 3), "channels"),
    ("DepthwiseConv2d-kernel_size-zero", lambda: DepthwiseConv2d(2, 0), "kernel_size"),
    ("DepthwiseConv2d-stride-zero", lambda: DepthwiseConv2d(2, 3, stride=0), "stride"),
    ("DepthwiseConv2d-dilation-zero", lambda: DepthwiseConv2d(2, 3, dilation=0), "dilation"),
    ("LSSL-d_model-zero", lambda: LSSL(0, 4), "d_model"),
    ("LSSL-d_state-zero", lambda: LSSL(2, 0), "d_state"),
    ("LSSL-measure-unknown", lambda: LSSL(2, 4, measure="fourier"), "measure"),
    ("LSSL-dt_min-zero", lambda: LSSL(2, 4, dt_min=0.0), "dt_min"),
    ("LSSL-dt_max-below-dt_min", lambda: LSSL(2, 4, dt_min=0.1, dt_max=0.01), "dt_max"),
    ("LSSL-dropout-above-one", lambda: LSSL(2, 4, dropout=1.5), "dropout"),
    ("LSSL-discretization-unknown", lambda: LSSL(2, 4, discretization="euler"), "discretization"),
    ("LSSL-alpha-out-of-range", lambda: LSSL(2, 4, alpha=1.5), "alpha"),
    ("Hopfield-input_size-zero", lambda: Hopfield(0), "input_size"),
    ("Hopfield-num_heads-zero", lambda: Hopfield(4, num_heads=0), "num_heads"),
    ("Hopfield-num_heads-above-input_size", lambda: Hopfield(4, num_heads=5), "hidden_size"),
    ("Hopfield-hidden_size-zero", lambda: Hopfield(4, hidden_size=0), "hidden_size"),
    ("Hopfield-pattern_size-negative", lambda: Hopfield(4, pattern_size=-1), "pattern_size"),
    ("Hopfield-output_size-zero", lambda: Hopfield(4, output_size=0), "output_size"),
    ("Hopfield-update_steps_max-float", lambda: Hopfield(4, update_steps_max=1.5), "update_steps_max"),
    ("Hopfield-update_steps_eps-negative", lambda: Hopfield(4, update_steps_eps=-1e-4), "update_steps_eps"),
    ("Hopfield-scaling-nan", lambda: Hopfield(4, scaling=NAN), "scaling"),
    ("Hopfield-dropout-one", lambda: Hopfield(4, dropout=1.0), "dropout"),
    ("HopfieldPooling-quantity-zero", lambda: HopfieldPooling(4, quantity=0), "quantity"),
    ("HopfieldLayer-quantity-zero", lambda: HopfieldLayer(4, quantity=0), "quantity"),
    ("HopfieldLayer-scaling-nan", lambda: HopfieldLayer(4, scaling=NAN), "scaling"),
    ("BinaryLinear-in_features-zero", lambda: BinaryLinear(0, 4), "in_features"),
    ("BinaryLinear-estimator-unknown", lambda: BinaryLinear(4, 4, estimator="sign"), "estimator"),
    ("BinaryLinear-scale-unknown", lambda: BinaryLinear(4, 4, scale="row"), "scale"),
    ("BinaryLinear-o_end-below-one", lambda: BinaryLinear(4, 4, o_end=0.5), "o_end"),
    ("BinaryLinear-t-zero", lambda: BinaryLinear(4, 4, t=0.0), "t"),
    ("BinaryLinear-delta-above-t", lambda: BinaryLinear(4, 4, t=1.0, delta=2.0), "delta"),
    ("QuantLinear-bits-3", lambda: QuantLinear(64, 4, bits=3), "bits"),
    ("QuantLinear-group_size-33", lambda: QuantLinear(64, 4, bits=4, group_size=33), "group_size"),
    ("QuantLinear-group_size-32-for-2-bits", lambda: QuantLinear(64, 4, bits=2, group_size=32), "group_size"),
    ("QuantLinear-scheme-unknown", lambda: QuantLinear(64, 4, scheme="log"), "scheme"),
    ("NeuralODE-func-not-module", lambda: NeuralODE(decay), "func", TypeError),
    ("NeuralODE-t_span-one-time", lambda: NeuralODE(nn.Linear(3, 3), t_span=(0.0,)), "t_span"),
    ("NeuralODE-t_span-decreasing", lambda: NeuralODE(nn.Linear(3, 3), t_span=(1.0, 0.0)), "t_span"),
    ("NeuralODE-t_span-nan", lambda: NeuralODE(nn.Linear(3, 3), t_span=(0.0, NAN)), "t_span"),
    ("NeuralODE-method-unknown", lambda: NeuralODE(nn.Linear(3, 3), method="dopri8"), "method"),
    ("NeuralODE-rtol-negative", lambda: NeuralODE(nn.Linear(3, 3), rtol=-1.0), "rtol"),
    ("NeuralODE-regularization-unknown", lambda: NeuralODE(nn.Linear(3, 3), regularization="l2"), "regularization"),
    ("NeuralODE-reg_weight-nan", lambda: NeuralODE(nn.Linear(3, 3), reg_weight=NAN), "reg_weight"),
    ("NeuralODE-option-unknown", lambda: NeuralODE(nn.Linear(3, 3), max_iterations=10), "max_iterations", TypeError),
    ("NeuralODE-option-out-of-range", lambda: NeuralODE(nn.Linear(3, 3), safety=2.0), "safety"),
]:
    bad(*_row)


# --- modules: forward -----------------------------------------------------------------------------------------------
def edge(**kw):
    return MixedOp(4, 1, **kw)


bad("MixedOp-x-wrong-channels", lambda: edge()(r(2, 3, 5, 5), torch.rand(8)), "x")
bad("MixedOp-x-wrong-rank", lambda: edge()(r(4, 5, 5), torch.rand(8)), "x")
bad("MixedOp-x-int", lambda: edge()(r(2, 4, 5, 5).int(), torch.rand(8)), "x", TypeError)
bad("MixedOp-x-not-tensor", lambda: edge()([1.0], torch.rand(8)), "x", TypeError)
bad("MixedOp-weights-wrong-size", lambda: edge()(r(2, 4, 5, 5), torch.rand(7)), "weights")
bad("MixedOp-weights-on-meta", lambda: edge()(r(2, 4, 5, 5), meta(torch.rand(8))), "weights")
bad("MixedOp-index-out-of-range", lambda: edge()(r(2, 4, 5, 5), torch.rand(8), index=8), "index")
bad("MixedOp-partial-x-wrong-channels", lambda: edge(partial_channels=2)(r(2, 6, 5, 5), torch.rand(8)), "x")
ok("MixedOp-empty-batch-eval", lambda: edge().eval()(r(0, 4, 5, 5), torch.rand(8)), empty_like_shape(0, 4, 5, 5))
# the widest candidates (sep_conv_5x5, dil_conv_5x5) see 4 pixels around: the NaN stays in that neighbourhood
ok("MixedOp-nan-in-x-eval", lambda: edge().eval()(with_value(r(1, 4, 14, 14), (0, 0, 10, 10), NAN), torch.rand(8)),
   lambda out: out[0, :, 10, 10].isnan().all() and out[0, :, :5, :5].isfinite().all())


def cell():
    return darts.Cell(2, 2, 4, 4, 4, False, False)


bad("Cell-weights-too-few-edges", lambda: cell()(r(1, 4, 5, 5), r(1, 4, 5, 5), torch.rand(4, 8)), "weights")
bad("Cell-weights-wrong-primitives", lambda: cell()(r(1, 4, 5, 5), r(1, 4, 5, 5), torch.rand(5, 7)), "weights")
bad("Cell-edge_scale-wrong-size",
    lambda: cell()(r(2, 4, 5, 5), r(2, 4, 5, 5), torch.rand(5, 8), edge_scale=torch.rand(4)), "edge_scale")
bad("Cell-index-wrong-length", lambda: cell()(r(2, 4, 5, 5), r(2, 4, 5, 5), torch.rand(5, 8), index=[0, 1]), "index")
bad("Cell-s0-wrong-channels", lambda: cell()(r(2, 3, 5, 5), r(2, 4, 5, 5), torch.rand(5, 8)), "s0")
bad("Cell-s1-wrong-channels", lambda: cell()(r(2, 4, 5, 5), r(2, 5, 5, 5), torch.rand(5, 8)), "s1")


def network():
    return darts.Network(4, 10, 1, None, 1, 1)


bad("Network-input-wrong-channels", lambda: network()(r(2, 1, 8, 8)), "input")
bad("Network-input-wrong-rank", lambda: network()(r(3, 8, 8)), "input")
bad("Network-input-int", lambda: network()(r(2, 3, 8, 8).int()), "input", TypeError)


def dwconv():
    return DepthwiseConv2d(2, 3)


bad("DepthwiseConv2d-x-wrong-channels", lambda: dwconv()(r(1, 3, 5, 5)), "x")
bad("DepthwiseConv2d-x-too-small", lambda: dwconv()(r(1, 2, 2, 2)), "x")
ok("DepthwiseConv2d-empty-batch", lambda: dwconv()(r(0, 2, 5, 5)), empty_like_shape(0, 2, 3, 3))
ok("DepthwiseConv2d-nan-in-x", lambda: dwconv()(with_value(r(1, 2, 5, 5), (0, 0, 4, 4), NAN)), nan_at((0, 0, 2, 2)))


def lssl():
    return LSSL(2, 4)


bad("LSSL-u-wrong-rank", lambda: lssl()(r(6, 2)), "u")
bad("LSSL-u-wrong-features", lambda: lssl()(r(1, 6, 3)), "u")
bad("LSSL-u-int", lambda: lssl()(r(1, 6, 2).int()), "u", TypeError)
bad("LSSL-u-float64", lambda: lssl()(r(1, 6, 2, dtype=torch.float64)), "u", TypeError)
bad("LSSL-u-on-meta", lambda: lssl()(meta(r(1, 6, 2))), "u")
bad("LSSL-u-empty-sequence", lambda: lssl()(r(1, 0, 2)), "u")
bad("LSSL-step-u_t-wrong-shape", lambda: lssl().step(r(1, 3), lssl().default_state(1)), "u_t")
bad("LSSL-step-state-wrong-shape", lambda: lssl().step(r(1, 2), r(1, 2, 5)), "state")
ok("LSSL-empty-batch", lambda: lssl()(r(0, 6, 2)), empty_like_shape(0, 6, 2))
ok("LSSL-nan-in-u", lambda: lssl().eval()(with_value(r(1, 6, 2), (0, 2, 0), NAN)),
   lambda out: out[0, 2:].isnan().all())


def hopfield(**kw):
    return Hopfield(4, num_heads=2, **kw)


bad("Hopfield-input-wrong-features", lambda: hopfield()(r(1, 3, 5)), "input")
bad("Hopfield-input-wrong-rank", lambda: hopfield()(r(3, 4)), "input")
bad("Hopfield-input-int", lambda: hopfield()(r(1, 3, 4).int()), "input", TypeError)
bad("Hopfield-state_pattern-wrong-features", lambda: hopfield()((r(1, 5, 4), r(1, 3, 3), r(1, 5, 4))), "state_pattern")
bad("Hopfield-stored_pattern-wrong-batch", lambda: hopfield()((r(2, 5, 4), r(1, 3, 4), r(2, 5, 4))), "stored_pattern")
bad("Hopfield-pattern_projection-wrong-length",
    lambda: hopfield()((r(1, 5, 4), r(1, 3, 4), r(1, 6, 4))), "pattern_projection")
bad("Hopfield-input-tuple-of-two", lambda: hopfield()((r(1, 5, 4), r(1, 3, 4))), "input")
bad("Hopfield-stored_pattern_padding_mask-wrong-shape",
    lambda: hopfield()(r(1, 3, 4), stored_pattern_padding_mask=torch.zeros(1, 4, dtype=torch.bool)),
    "stored_pattern_padding_mask")
bad("Hopfield-stored_pattern_padding_mask-float",
    lambda: hopfield()(r(1, 3, 4), stored_pattern_padding_mask=torch.zeros(1, 3)), "stored_pattern_padding_mask")
bad("Hopfield-association_mask-wrong-shape",
    lambda: hopfield()(r(1, 3, 4), association_mask=torch.zeros(3, 4, dtype=torch.bool)), "association_mask")
bad("Hopfield-association_mask-wrong-batch-heads",
    lambda: hopfield()(r(1, 3, 4), association_mask=torch.zeros(3, 3, 3, dtype=torch.bool)), "association_mask")
bad("Hopfield-association_mask-int",
    lambda: hopfield()(r(1, 3, 4), association_mask=torch.zeros(3, 3, dtype=torch.int32)), "association_mask",
    TypeError)
ok("Hopfield-empty-batch", lambda: hopfield()(r(0, 3, 4)), empty_like_shape(0, 3, 4))
ok("Hopfield-nan-in-state", lambda: hopfield()((r(1, 5, 4), with_value(r(1, 3, 4), (0, 1, 2), NAN), r(1, 5, 4))),
   nan_at((0, 1)))

bad("HopfieldPooling-input-wrong-features", lambda: HopfieldPooling(4)(r(2, 5, 3)), "input")
bad("HopfieldPooling-input-wrong-rank", lambda: HopfieldPooling(4)(r(5, 4)), "input")
bad("HopfieldPooling-stored_pattern_padding_mask-wrong-shape",
    lambda: HopfieldPooling(4)(r(2, 5, 4), torch.zeros(2, 4, dtype=torch.bool)), "stored_pattern_padding_mask")
ok("HopfieldPooling-nan-in-input", lambda: HopfieldPooling(4)(with_value(r(2, 5, 4), (1, 3, 0), NAN)), nan_at(1))
bad("HopfieldLayer-input-wrong-features", lambda: HopfieldLayer(4, 3)(r(2, 5, 3)), "input")
bad("HopfieldLayer-input-wrong-rank", lambda: HopfieldLayer(4, 3)(r(5, 4)), "input")
bad("HopfieldLayer-association_mask-wrong-shape",
    lambda: HopfieldLayer(4, 3)(r(2, 5, 4), association_mask=torch.zeros(5, 4, dtype=torch.bool)), "association_mask")
ok("HopfieldLayer-nan-in-input", lambda: HopfieldLayer(4, 3)(with_value(r(2, 5, 4), (0, 2, 1), NAN)), nan_at((0, 2)))


def binary(**kw):
    return BinaryLinear(40, 4, **kw)


for _mode in ("train", "eval"):
    bad(f"BinaryLinear-{_mode}-x-wrong-features", lambda m=_mode: getattr(binary(), m)()(r(3, 39)), "x")
    bad(f"BinaryLinear-{_mode}-x-int", lambda m=_mode: getattr(binary(), m)()(r(3, 40).int()), "x", TypeError)
    bad(f"BinaryLinear-{_mode}-x-not-tensor", lambda m=_mode: getattr(binary(), m)()([1.0]), "x", TypeError)
bad("BinaryLinear-eval-x-on-meta", lambda: binary().eval()(meta(r(3, 40))), "x")
bad("BinaryLinear-packed-x-wrong-features", lambda: binary().pack()(r(3, 41)), "x")
ok("BinaryLinear-eval-empty-batch", lambda: binary().eval()(r(0, 40)), empty_like_shape(0, 4))
ok("BinaryLinear-train-nan-in-x-is-plus-one",
   lambda: (binary()(with_value(r(3, 40), (0, 0), NAN)),), lambda out: out[0].isfinite().all())


def quant(**kw):
    return QuantLinear(64, 4, **kw)


for _mode in ("train", "eval"):
    bad(f"QuantLinear-{_mode}-x-wrong-features", lambda m=_mode: getattr(quant(), m)()(r(3, 63)), "x")
    bad(f"QuantLinear-{_mode}-x-int", lambda m=_mode: getattr(quant(), m)()(r(3, 64).int()), "x", TypeError)
    ok(f"QuantLinear-{_mode}-nan-in-x", lambda m=_mode: getattr(quant(), m)()(with_value(r(3, 64), (2, 5), NAN)),
       nan_at(2))
bad("QuantLinear-eval-x-on-meta", lambda: quant().eval()(meta(r(3, 64))), "x")
bad("QuantLinear-packed-4-bits-x-wrong-features", lambda: quant(bits=4, group_size=32).pack()(r(3, 32)), "x")
ok("QuantLinear-eval-empty-batch", lambda: quant(bits=4, group_size=32).eval()(r(0, 64)), empty_like_shape(0, 4))


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, t, y):
        return self.linear(y)


def node(**kw):
    return NeuralODE(Field(), **kw)


bad("NeuralODE-x-wrong-rank", lambda: node()(r(1, 2, 3)), "x")
bad("NeuralODE-x-int", lambda: node()(r(2, 3).int()), "x")
bad("NeuralODE-x-nan", lambda: node()(with_value(r(2, 3), (0, 1), NAN)), "y0", RuntimeError, match="sample 0")
ok("NeuralODE-empty-batch", lambda: node()(r(0, 3)), empty_like_shape(0, 3))
