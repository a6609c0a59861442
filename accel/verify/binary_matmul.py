"""Verification cases for accel.ops.binary_matmul: the exact dot products and the scale + bias epilogue against
the float64 product of the sign matrices, at odd sizes."""
import torch

import accel.ops
from accel.reference import binary as reference

# (M, N, K)
CASES = [(1, 1, 1), (7, 33, 1000), (64, 130, 4096), (5, 1000, 33)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for M, N, K in CASES:
        x = torch.randn(M, K, generator=gen)
        w = torch.randn(N, K, generator=gen)
        bias = torch.randn(N, generator=gen)
        alpha = reference.channel_scale(w)
        a_bits, w_bits = accel.ops.pack_bits(x.to(device)), accel.ops.pack_bits(w.to(device))
        dots = accel.ops.binary_matmul(a_bits, w_bits, K).cpu().double()
        layer = accel.ops.binary_matmul(a_bits, w_bits, K, scale=alpha.to(device), bias=bias.to(device)).cpu()
        layer32 = reference.sign(x) @ reference.sign(w).T * alpha + bias  # fake quantization in float32
        results = ([dots, layer], [reference.binary_matmul(x, w), layer32],
                   [reference.binary_matmul(x, w), reference.binary_matmul(x, w, alpha, bias)])
        yield from compare("binary_matmul", f"{M}x{N}x{K}", ["dots", "scaled + bias"], *results)
