"""Benchmark cases for `accel.ops.krylov_kernel`, the LSSL convolution kernel K_l = C dA^l dB.

Shapes from the LSSL paper's setting: H = 256 features, N = 64 states, M = 1 channel, L in {1024, 4096}; the
system is the LegS HiPPO matrix discretised by the bilinear transform with steps dt in [1e-3, 1e-1]. The
eager baseline is the reference code's own method, repeated squaring, which forms the (H, N, L) Krylov
tensor (accel.reference.lssl.krylov_squaring); torch.compile of it is timed beside it.
"""
import math

import torch

from accel.benchmark.harness import Case
from accel.ops import krylov_kernel
from accel.reference import lssl as reference

OP = "krylov_kernel"
H, N, M = 256, 64, 1


def _setup(L: int):
    def setup(device: torch.device):
        gen = torch.Generator().manual_seed(0)
        A, B = reference.hippo("legs", N)
        dt = torch.exp(torch.rand(H, generator=gen, dtype=torch.float64) * math.log(100.0) + math.log(1e-3))
        dA, dB = reference.discretize(A, B, dt)
        C = torch.randn(H, M, N, generator=gen, dtype=torch.float64)
        return tuple(t.float().to(device).requires_grad_() for t in (dA, dB, C))

    return setup


def _fast(L):
    return lambda dA, dB, C: krylov_kernel(dA, dB, C, L)


def _squaring(L):
    return lambda dA, dB, C: reference.krylov_squaring(dA, dB, C, L)


def _case(L: int) -> Case:
    c = 1 << max(0, round(math.log2(math.sqrt(L))))
    # The blocked algorithm's multiply-adds (forward; the backward is about three times that): squarings,
    # the two chains and the final product.
    forward = H * (math.log2(c) * N ** 3 + c * M * N * N + (L // c) * N * N + L * M * N)
    return Case(
        name=f"L_{L}",
        op=OP,
        shape=f"H={H} N={N} M={M} L={L}",
        setup=_setup(L),
        fast=_fast(L),
        reference=_squaring(L),
        bytes_moved={"fwd": 0, "fwd+bwd": 0},  # compute-bound: the roofline is the FLOP bound
        flops={"fwd": 2 * forward, "fwd+bwd": 8 * forward},
        size=L,
        sweeps=("L",),
        params={"H": H, "N": N, "M": M, "L": L},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """L = 1024 and 4096; --quick: L = 256."""
    return [_case(256)] if quick else [_case(1024), _case(4096)]
