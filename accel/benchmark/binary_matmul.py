"""Benchmark cases for `accel.ops.binary_linear` (binary_matmul with activations packed on the fly): a binary
Linear layer's inference, y = (sign(x) sign(W)^T) * alpha + bias with alpha = mean |W| per output row.

Shapes: K = N = 4096 with batch M in {1, 8, 64}, and 1024 x 1024 at M = 64. The eager baseline is what binary
networks run today, fake quantization: sign() of the float activations and weights, then a float32 product;
torch.compile of it is timed beside it. The peers are the layers a binary one replaces: `float32`, the dense
float32 Linear (torch.matmul), and `int8_dynamic`, torch's dynamically quantized int8 Linear (FBGEMM). The
weight bytes of each are in the case's shape.
"""
import torch
import torch.nn.functional as F

from accel.benchmark.harness import Case
from accel.benchmark.linear_peers import build_int8_dynamic, mib, peers
from accel.ops import binary_linear, pack_bits
from accel.reference.binary import sign


def _case(M: int, K: int, N: int, device: torch.device) -> Case:
    layer = {}

    def setup(device: torch.device):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=gen).to(device)
        bias = torch.randn(N, generator=gen).to(device)
        layer.update(w=w, bias=bias, alpha=w.abs().mean(1), bits=pack_bits(w))
        build_int8_dynamic(layer, timed)
        return (torch.randn(M, K, generator=gen).to(device),)

    timed = peers(layer, device)
    packed = 4 * N * ((K + 31) // 32)
    return Case(
        name=f"M{M}_K{K}_N{N}",
        op="binary_matmul",
        shape=f"M={M} K={K} N={N}; weights: packed {mib(packed)}, float32 {mib(4 * N * K)}, int8 {mib(N * K)}",
        setup=setup,
        fast=lambda x: binary_linear(x, layer["bits"], K, scale=layer["alpha"], bias=layer["bias"]),
        reference=lambda x: F.linear(sign(x), sign(layer["w"])) * layer["alpha"] + layer["bias"],
        peers=timed,
        backward=False,
        bytes_moved={"fwd": packed + 4 * M * (K + N)},
        flops={"fwd": 0},  # XOR and popcount: the bound is the packed weights' bytes
        size=M * K * N,
        sweeps=("batch",) if K == 4096 else (),
        params={"M": M, "K": K, "N": N, "weight_bytes": {"packed": packed, "float32": 4 * N * K, "int8": N * K}},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """K = N = 4096 at M = 1, 8, 64 and 1024 x 1024 at M = 64; --quick: M = 1 and 64 at 1024 x 1024."""
    if quick:
        return [_case(1, 1024, 1024, device), _case(64, 1024, 1024, device)]
    return [_case(M, K, N, device) for M, K, N in ((1, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096),
                                                   (64, 1024, 1024))]
