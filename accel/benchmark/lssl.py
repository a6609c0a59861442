"""Benchmark cases for the whole LSSL layer, `accel.nn.LSSL`: Krylov kernel, FFT convolution with the D skip and
GELU, dropout (0) and the output map, forward and forward+backward (all parameter gradients).

Shapes from the LSSL setting: batch 16, H = 256 features, N = 64 states, M = 1 channel, L in {1024, 4096}. The
eager baseline is the same layer computed as the reference code does, with the very same parameters: the
Krylov tensor by repeated squaring (accel.reference.lssl.krylov_squaring), then the FFT convolution of
accel.reference.lssl.causal_conv.
"""
import torch

from accel.benchmark.harness import Case
from accel.nn import LSSL
from accel.reference import lssl as reference

OP = "lssl"
BATCH, H, N = 16, 256, 64


def _setup(L: int):
    def setup(device: torch.device):
        torch.manual_seed(0)
        layer = LSSL(H, N).to(device)
        u = torch.randn(BATCH, L, H, device=device, requires_grad=True)
        return u, list(layer.parameters()), layer

    return setup


def _fast(u, params, layer):
    return layer(u)


def _eager(u, params, layer):
    dA, dB = reference.discretize(layer.A, layer.B, layer.log_dt.exp(), layer.discretization, layer.alpha)
    K = reference.krylov_squaring(dA, dB, layer.C, u.shape[1])
    y = reference.causal_conv(u, K, layer.D, "gelu")
    return layer.output_linear(y.flatten(2))


def _case(L: int) -> Case:
    # FLOPs of the fast layer, forward: the Krylov kernel's blocked algorithm (see krylov_kernel.py, c ~ sqrt(L)),
    # three real FFTs of length 2L per (batch, feature) (5 n log2 n each, halved for real input), the output map.
    c = 1 << (L.bit_length() // 2)
    krylov = 2 * H * ((c.bit_length() - 1) * N ** 3 + c * N * N + (L // c) * N * N + L * N)
    n = 2 * L
    ffts = 3 * BATCH * H * 2.5 * n * (n.bit_length() - 1)
    linear = 2 * BATCH * L * H * H
    forward = krylov + ffts + linear
    return Case(
        name=f"L_{L}",
        op=OP,
        shape=f"B={BATCH} L={L} H={H} N={N}",
        setup=_setup(L),
        fast=_fast,
        reference=_eager,
        bytes_moved={"fwd": 0, "fwd+bwd": 0},
        flops={"fwd": forward, "fwd+bwd": 3 * forward},
        size=L,
        sweeps=("L",),
        params={"batch": BATCH, "H": H, "N": N, "L": L},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """L = 1024 and 4096; none in --quick (the eager layer's Krylov tensor takes seconds)."""
    return [] if quick else [_case(1024), _case(4096)]
