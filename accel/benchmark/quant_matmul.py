"""Benchmark cases for `accel.ops.quant_matmul`: a quantized Linear layer's inference at K = N = 4096, batch M in
{1, 8, 64}, with int8 weights (activations quantized per row inside the op) and with 4-bit weight-only groups of
128 (float activations).

The eager baseline is what quantization-aware models run today, fake quantization: the weights dequantized to
float32 and a float32 product (for int8, the activations quantized and dequantized too); torch.compile of it is
timed beside it. The peers: `float32`, the dense float32 Linear, and `int8_dynamic`, torch's dynamically
quantized int8 Linear (FBGEMM). The weight bytes of each are in the case's shape.
"""
import torch
import torch.nn.functional as F

from accel.benchmark.harness import Case
from accel.benchmark.linear_peers import build_int8_dynamic, mib, peers
from accel.ops import dequantize, quant_matmul, quantize


def _case(M: int, K: int, N: int, bits: int, device: torch.device) -> Case:
    layer = {}
    group_size = None if bits == 8 else 128
    scheme = "symmetric" if bits == 8 else "minmax"

    def setup(device: torch.device):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=gen).to(device)
        bias = torch.randn(N, generator=gen).to(device)
        qw = quantize(w, bits, group_size, scheme)
        layer.update(w=w, bias=bias, qw=qw, w_hat=dequantize(qw))
        build_int8_dynamic(layer, timed)
        return (torch.randn(M, K, generator=gen).to(device),)

    def fake_quantized(x):
        if bits == 8:
            x = dequantize(quantize(x, 8))
        return F.linear(x, layer["w_hat"], layer["bias"])

    timed = peers(layer, device)
    weight_bytes = N * K * bits // 8
    return Case(
        name=f"int{bits}_M{M}",
        op="quant_matmul",
        shape=f"int{bits}{'' if bits == 8 else ' weight-only, groups of 128'} M={M} K={K} N={N}; weights: "
              f"{mib(weight_bytes)} vs float32 {mib(4 * N * K)}, FBGEMM int8 {mib(N * K)}",
        setup=setup,
        fast=lambda x: quant_matmul(x, layer["qw"], layer["bias"]),
        reference=fake_quantized,
        peers=timed,
        backward=False,
        bytes_moved={"fwd": weight_bytes + 4 * M * (K + N)},
        flops={"fwd": 2 * M * K * N},
        size=M * K * N,
        sweeps=(f"int{bits}",),
        params={"M": M, "K": K, "N": N, "bits": bits, "weight_bytes": weight_bytes},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """int8 and int4 at K = N = 4096, M = 1, 8, 64; --quick: M = 1 at 1024 x 1024."""
    if quick:
        return [_case(1, 1024, 1024, bits, device) for bits in (8, 4)]
    return [_case(M, 4096, 4096, bits, device) for bits in (8, 4) for M in (1, 8, 64)]
