"""Benchmark cases for `accel.ops.mixed_op`, the DARTS mixed-op weighted sum out = sum_k w_k y_k.

The headline shape is DARTS' search phase (Liu et al., 2019): K = 8 candidate ops per edge, each output
64 x 16 x 32 x 32 float32, mixed by softmax(alpha / tau) with tau = 1. Around it: the same shape with the
weights given directly (DARTS' ``MixedOp.forward(x, weights)``), a sweep over the feature-map size, and a
sweep over K (4, 8 and 14, the op counts of reduced, DARTS and extended search spaces).
"""
import torch

from accel.ops import mixed_op
from accel.reference import mixed_op as reference
from accel.benchmark.harness import Case

OP = "mixed_op"
TAU = 1.0
DARTS_SHAPE = (64, 16, 32, 32)
DARTS_K = 8


def _fast_alpha(ys, alpha):
    return mixed_op(ys, alpha=alpha, tau=TAU)


def _reference_alpha(ys, alpha):
    return reference.mixed_op(ys, alpha, TAU)


def _fast_weights(ys, weights):
    return mixed_op(ys, weights)


def _reference_weights(ys, weights):
    return reference.mixed_op(ys, weights, None)


def _setup(k: int, shape: tuple[int, ...], mix: str):
    """Inputs for K branches of ``shape``: the branch outputs and alpha logits (``mix="alpha"``) or
    softmax weights (``mix="weights"``), all requiring grad as in a search step."""

    def setup(device: torch.device):
        gen = torch.Generator().manual_seed(0)
        ys = [torch.randn(shape, generator=gen).to(device).requires_grad_() for _ in range(k)]
        logits = torch.randn(k, generator=gen)
        mix_tensor = logits if mix == "alpha" else torch.softmax(logits, 0)
        return ys, mix_tensor.to(device).requires_grad_()

    return setup


def _case(name: str, k: int, shape: tuple[int, ...], mix: str = "alpha", sweeps: tuple[str, ...] = ()) -> Case:
    n = 1
    for d in shape:
        n *= d
    elem = 4  # float32
    # The fast op's unavoidable traffic: forward reads K branches and writes out; backward reads the upstream
    # grad and K branches and writes K branch grads. FLOPs: forward K mul + K add per element; backward K mul
    # for the branch grads and K mul + K add for the K dot products of the weight gradient.
    fwd_bytes, bwd_bytes = (k + 1) * n * elem, (2 * k + 1) * n * elem
    fwd_flops, bwd_flops = 2 * k * n, 3 * k * n
    fast, ref = (_fast_alpha, _reference_alpha) if mix == "alpha" else (_fast_weights, _reference_weights)
    return Case(
        name=name,
        op=OP,
        shape=f"{k} x {'x'.join(map(str, shape))}",
        setup=_setup(k, shape, mix),
        fast=fast,
        reference=ref,
        bytes_moved={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        size=k * n * elem,
        sweeps=sweeps,
        params={"K": k, "shape": list(shape), "dtype": "float32", "mix": mix, "tau": TAU if mix == "alpha" else None},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """The DARTS search case first; ``quick`` keeps two small cases for a smoke run."""
    if quick:
        small = (16, 16, 16, 16)
        return [_case("quick_alpha", DARTS_K, small), _case("quick_weights", DARTS_K, small, mix="weights")]
    n, c, h, w = DARTS_SHAPE
    return [
        _case("darts_search", DARTS_K, DARTS_SHAPE, sweeps=("size", "K")),
        _case("darts_weights", DARTS_K, DARTS_SHAPE, mix="weights"),
        _case("spatial_8", DARTS_K, (n, c, 8, 8), sweeps=("size",)),
        _case("spatial_16", DARTS_K, (n, c, 16, 16), sweeps=("size",)),
        _case("channels_32", DARTS_K, (n, 32, h, w), sweeps=("size",)),
        _case("channels_64", DARTS_K, (n, 64, h, w), sweeps=("size",)),
        _case("k_4", 4, DARTS_SHAPE, sweeps=("K",)),
        _case("k_14", 14, DARTS_SHAPE, sweeps=("K",)),
    ]
