"""Small calls of every public op (accel.ops.__all__) and of accel.odeint, shared by test_threads.py and
test_determinism.py: each case builds its inputs from a seed (its own torch.Generator, so that building inputs in
several threads at once does not depend on the order in which the threads draw from the global generator) and
runs them to a flat list of result tensors: the outputs and, for ops with a backward, the gradients of a fixed
random cotangent. Stateful arguments (BatchNorm running statistics, rk_accept's in-place solver state) are copied
inside the run, and what the op writes to them is returned as results too."""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import accel
import accel.ops as ops
from accel.reference import lssl as lssl_reference
from accel.reference.ode import DOPRI5

C_DOPRI5 = [0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0, 1.0]


@dataclass
class Case:
    name: str
    make: Callable[[torch.Generator], dict]  # inputs from a seeded generator
    run: Callable[[dict], list]  # inputs -> result tensors
    backward: bool  # whether the results include gradients
    ops: tuple  # the accel.ops names this case calls


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _grads(outputs, inputs, cotangents):
    """The outputs, then the gradients of <outputs, cotangents> with respect to inputs."""
    outputs = list(outputs)
    return outputs + list(torch.autograd.grad(outputs, inputs, cotangents))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# ---- DARTS ----

def _mixed_op_make(gen):
    # 4 * 8 * 33 * 33 = 34848 elements: more than one of the backward's fixed reduction chunks (32768) and more
    # than one forward task, so the thread-count comparison splits the work.
    shape = (4, 8, 33, 33)
    return dict(ys=[_randn(gen, *shape) for _ in range(4)], alpha=_randn(gen, 4), g=_randn(gen, *shape))


def _mixed_op_run(d):
    ys, alpha = _leaves(*d["ys"]), _leaves(d["alpha"])[0]
    out = ops.mixed_op(ys, alpha=alpha, tau=0.7)
    return _grads([out], [*ys, alpha], [d["g"]])


def _depthwise_make(gen):
    return dict(x=_randn(gen, 3, 5, 11, 13), w=_randn(gen, 5, 1, 3, 3), g=_randn(gen, 3, 5, 11, 13),
                x2=_randn(gen, 2, 4, 9, 9), w2=_randn(gen, 4, 1, 5, 5), g2=_randn(gen, 2, 4, 5, 5))


def _depthwise_run(d):
    x, w = _leaves(d["x"], d["w"])
    out = ops.depthwise_conv2d(x, w, 1, 2, 2)  # a dilated conv (stride 1)
    x2, w2 = _leaves(d["x2"], d["w2"])
    out2 = ops.depthwise_conv2d(x2, w2, 2, 2, 1)  # a reduction edge's first conv (stride 2)
    return _grads([out], [x, w], [d["g"]]) + _grads([out2], [x2, w2], [d["g2"]])


def _pool_make(gen):
    return dict(x=_randn(gen, 3, 5, 9, 7), w=torch.rand(2, generator=gen) + 0.1, g=_randn(gen, 3, 5, 9, 7))


def _pool_run(d):
    C = d["x"].shape[1]
    max_bn, avg_bn = nn.BatchNorm2d(C, affine=False), nn.BatchNorm2d(C, affine=False)
    x, w = _leaves(d["x"], d["w"])
    out = ops.darts_pool_branches(x, w, max_bn, avg_bn)
    return _grads([out], [x, w], [d["g"]]) + [max_bn.running_mean, max_bn.running_var, avg_bn.running_mean,
                                              avg_bn.running_var]


def _bn_mix_make(gen):
    # 8 * 8 planes of 81: more planes than one task's grain (4096 / 81), so two threads split the statistics
    # and the mix
    shape = (8, 8, 9, 9)
    return dict(zs=[_randn(gen, *shape) + 2.0 for _ in range(3)], w=torch.rand(3, generator=gen) + 0.1,
                g=_randn(gen, *shape))


def _bn_mix_run(d):
    norms = [nn.BatchNorm2d(d["zs"][0].shape[1], affine=False) for _ in d["zs"]]
    zs, w = _leaves(*d["zs"]), _leaves(d["w"])[0]
    out = ops.batch_norm_mix(zs, w, norms)
    return _grads([out], [*zs, w], [d["g"]]) + [t for bn in norms for t in (bn.running_mean, bn.running_var)]


# ---- LSSL ----

def _krylov_make(gen):
    A, B = lssl_reference.hippo("legs", 8)
    dt = torch.rand(3, generator=gen, dtype=torch.float64) * 0.05 + 1e-3
    dA, dB = lssl_reference.discretize(A, B, dt)
    return dict(dA=dA.float(), dB=dB.float(), C=_randn(gen, 3, 2, 8), g=_randn(gen, 3, 2, 77))


def _krylov_run(d):
    dA, dB, C = _leaves(d["dA"], d["dB"], d["C"])
    return _grads([ops.krylov_kernel(dA, dB, C, 77)], [dA, dB, C], [d["g"]])


def _causal_make(gen):
    # L = 40 takes the direct sum over lags, L = 300 the FFT path (bidirectional)
    out = {}
    for L in (40, 300):
        out[L] = dict(u=_randn(gen, 2, L, 3), K=_randn(gen, 3, 2, L) * 0.1, D=_randn(gen, 3, 2),
                      Kr=_randn(gen, 3, 2, L) * 0.1, g=_randn(gen, 2, L, 3, 2))
    return out


def _causal_run(d):
    results = []
    for L, reverse in ((40, False), (300, True)):
        e = d[L]
        u, K, D = _leaves(e["u"], e["K"], e["D"])
        y = ops.causal_conv(u, K, D, "gelu", e["Kr"] if reverse else None)
        results += _grads([y], [u, K, D], [e["g"]])
    return results


# ---- Hopfield ----

def _hopfield_make(gen):
    padding = torch.rand(2, 13, generator=gen) < 0.25
    padding[:, 0] = False
    return dict(q=_randn(gen, 2, 3, 7, 8), k=_randn(gen, 2, 3, 13, 8), v=_randn(gen, 2, 3, 13, 5),
                beta=torch.tensor(0.5), padding=padding, g=_randn(gen, 2, 3, 7, 5))


def _hopfield_run(d):
    q, k, v, beta = _leaves(d["q"], d["k"], d["v"], d["beta"])
    out = ops.hopfield_update(q, k, v, beta, 3, key_padding_mask=d["padding"], eps=1e-3)
    return _grads([out], [q, k, v, beta], [d["g"]])


def _energy_make(gen):
    return dict(xi=_randn(gen, 2, 5, 8), X=_randn(gen, 2, 9, 8), g=_randn(gen, 2, 5))


def _energy_run(d):
    xi, X = _leaves(d["xi"], d["X"])
    return _grads([ops.hopfield_energy(xi, X, 0.5)], [xi, X], [d["g"]])


# ---- binary ----

def _binary_make(gen):
    return dict(x=_randn(gen, 7, 70), w=_randn(gen, 11, 70), scale=torch.rand(11, generator=gen),
                bias=_randn(gen, 11), g=_randn(gen, 7, 70))


def _bits_run(d):
    packed = ops.pack_bits(d["x"])
    return [packed, ops.unpack_bits(packed, 70), ops.pack_bits(d["x"].T.contiguous(), dim=0)]


def _binary_matmul_run(d):
    a, b = ops.pack_bits(d["x"]), ops.pack_bits(d["w"])
    return [ops.binary_matmul(a, b, 70), ops.binary_matmul(a, b, 70, scale=d["scale"], bias=d["bias"]),
            ops.binary_matmul(a, b, 70, output="bits")]


def _binary_linear_run(d):
    return [ops.binary_linear(d["x"], ops.pack_bits(d["w"]), scale=d["scale"], bias=d["bias"])]


def _binarize_run(d):
    x = _leaves(d["x"])[0]
    return _grads([ops.binarize(x, "reste", o=2.0)], [x], [d["g"]])


# ---- quantization ----

def _quant_make(gen):
    return dict(w=_randn(gen, 9, 70), x=_randn(gen, 5, 70), bias=_randn(gen, 9), fx=_randn(gen, 5, 64),
                g=_randn(gen, 5, 64), points=torch.sort(_randn(gen, 7)).values.flip(0), px=_randn(gen, 5, 33),
                pg=_randn(gen, 5, 33))


def _quantized(w):
    return [ops.quantize(w, 8), ops.quantize(w, 4, 32, "minmax"), ops.quantize(w, 2, 64, "symmetric")]


def _quantize_run(d):
    results = []
    for q in _quantized(d["w"]):
        results += [q.codes, q.step, q.offset, ops.dequantize(q)]
    return results


def _quant_matmul_run(d):
    return [ops.quant_matmul(d["x"], q, d["bias"]) for q in _quantized(d["w"])]


def _fake_quantize_run(d):
    x = _leaves(d["fx"])[0]
    return _grads([ops.fake_quantize(x, 4, 32, "minmax")], [x], [d["g"]])


def _points_run(d):
    x, points = _leaves(d["px"], d["points"])
    return _grads([ops.quantize_to_points(x, points)], [x, points], [d["pg"]])


# ---- ODE ----

def _rk_make(gen, B=64, D=1100, s=7):
    # rows longer than a tile (512), cut into pieces, and enough tiles (about 2^18 element accesses per task)
    # that two threads split the rows
    y0 = _randn(gen, B, D, dtype=torch.float64)
    return dict(y0=y0, y1=y0 + 0.1 * _randn(gen, B, D, dtype=torch.float64),
                k=_randn(gen, s, B, D, dtype=torch.float64),
                g_prev=y0 + 0.1 * _randn(gen, B, D, dtype=torch.float64),
                h=torch.rand(B, generator=gen, dtype=torch.float64) * 0.1 + 0.01,
                gg=_randn(gen, B, D, dtype=torch.float64), gn=torch.rand(2, B, generator=gen, dtype=torch.float64))


def _rk_stage_run(d):
    y0, k, h = _leaves(d["y0"], d["k"], d["h"])
    return _grads([ops.rk_stage(y0, k, h, list(DOPRI5.a[5]))], [y0, k, h], [d["gg"]])


def _rk_finalize_run(d):
    leaves = _leaves(d["y0"], d["y1"], d["k"], d["g_prev"], d["h"])
    outputs = ops.rk_finalize(*leaves, list(DOPRI5.b_err), 1e-4, 1e-6)
    return _grads(outputs, leaves, list(d["gn"]))


def _rk_control_make(gen, B=9, D=5, s=7):
    times = torch.tensor([0.0, 0.5, 1.25, 2.0], dtype=torch.float64)
    T = times.shape[0]
    next_index = torch.randint(1, T + 1, (B,), generator=gen)
    t = times[(next_index - 1).clamp(max=T - 1)] + torch.rand(B, generator=gen, dtype=torch.float64) * 0.3
    t = torch.minimum(t, times[next_index.clamp(max=T - 1)])
    t[next_index >= T] = times[-1]
    state = dict(y=_randn(gen, B, D, dtype=torch.float64), k=_randn(gen, s, B, D, dtype=torch.float64), t=t,
                 h=torch.rand(B, generator=gen, dtype=torch.float64) * 0.6 + 1e-3, next_index=next_index,
                 previous=torch.rand(B, generator=gen, dtype=torch.float64),
                 out=_randn(gen, T, B, D, dtype=torch.float64))
    return dict(state=state, times=times, y1=_randn(gen, B, D, dtype=torch.float64),
                norm=torch.rand(B, generator=gen, dtype=torch.float64) * 2)


def _rk_control_run(d):
    state = {name: x.clone() for name, x in d["state"].items()}
    step, stage_times = ops.rk_begin(state["t"], state["h"], state["next_index"], d["times"], C_DOPRI5)
    status, unfinished = ops.rk_accept(*state.values(), d["y1"], d["norm"], step, d["times"], 0.9, 5, True, True,
                                       DOPRI5.interpolant)
    return [step, stage_times, status, unfinished, *state.values()]


def _odeint_make(gen):
    return dict(y0=_randn(gen, 3, 4, dtype=torch.float64), w=_randn(gen, 4, 4, dtype=torch.float64) * 0.5,
                t=torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64), g=_randn(gen, 3, 3, 4, dtype=torch.float64))


def _odeint_run(d):
    y0, w = _leaves(d["y0"], d["w"])
    ys = accel.odeint(lambda t, y: torch.tanh(y @ w), y0, d["t"], rtol=1e-5, atol=1e-7)
    return _grads([ys], [y0, w], [d["g"]])


def _odeint_per_sample_run(d):
    y0, w = _leaves(d["y0"], d["w"])
    ys = accel.odeint(lambda t, y: torch.tanh(y @ w), y0, d["t"], rtol=1e-5, atol=1e-7, per_sample=True,
                      options={"params": (w,)})
    return _grads([ys], [y0, w], [d["g"]])


CASES = [
    Case("mixed_op", _mixed_op_make, _mixed_op_run, True, ("mixed_op",)),
    Case("depthwise_conv2d", _depthwise_make, _depthwise_run, True, ("depthwise_conv2d",)),
    Case("darts_pool_branches", _pool_make, _pool_run, True, ("darts_pool_branches",)),
    Case("batch_norm_mix", _bn_mix_make, _bn_mix_run, True, ("batch_norm_mix",)),
    Case("krylov_kernel", _krylov_make, _krylov_run, True, ("krylov_kernel",)),
    Case("causal_conv", _causal_make, _causal_run, True, ("causal_conv",)),
    Case("hopfield_update", _hopfield_make, _hopfield_run, True, ("hopfield_update",)),
    Case("hopfield_energy", _energy_make, _energy_run, True, ("hopfield_energy",)),
    Case("pack_bits", _binary_make, _bits_run, False, ("pack_bits", "unpack_bits")),
    Case("binary_matmul", _binary_make, _binary_matmul_run, False, ("binary_matmul",)),
    Case("binary_linear", _binary_make, _binary_linear_run, False, ("binary_linear",)),
    Case("binarize", _binary_make, _binarize_run, True, ("binarize",)),
    Case("quantize", _quant_make, _quantize_run, False, ("quantize", "dequantize", "QuantizedWeight")),
    Case("quant_matmul", _quant_make, _quant_matmul_run, False, ("quant_matmul",)),
    Case("fake_quantize", _quant_make, _fake_quantize_run, True, ("fake_quantize",)),
    Case("quantize_to_points", _quant_make, _points_run, True, ("quantize_to_points",)),
    Case("rk_stage", _rk_make, _rk_stage_run, True, ("rk_stage",)),
    Case("rk_finalize", _rk_make, _rk_finalize_run, True, ("rk_finalize",)),
    Case("rk_control", _rk_control_make, _rk_control_run, False, ("rk_begin", "rk_accept")),
    Case("odeint", _odeint_make, _odeint_run, True, ()),
    Case("odeint_per_sample", _odeint_make, _odeint_per_sample_run, True, ()),
]


def run_case(case: Case, seed: int) -> list:
    return case.run(case.make(torch.Generator().manual_seed(seed)))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaNs included, +0 and -0 told apart)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def assert_bitwise_equal(got: list, want: list, what: str):
    assert len(got) == len(want), f"{what}: {len(got)} results, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if not bitwise_equal(a, b):
            detail = (f"max abs difference {(a.double() - b.double()).abs().max().item()}" if a.shape == b.shape
                      else f"shape {tuple(a.shape)} != {tuple(b.shape)}")
            raise AssertionError(f"{what}: result {i} differs ({detail})")
