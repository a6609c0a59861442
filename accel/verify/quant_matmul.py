"""Verification cases for accel.ops.quant_matmul: the int8 product (activations quantized inside) and the 4-bit
weight-only product against float64 products of the same dequantized operands, at odd sizes."""
import torch
import torch.nn.functional as F

import accel.ops

# (M, N, K)
CASES = [(1, 7, 33), (5, 64, 1000), (64, 130, 4096)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for M, N, K in CASES:
        x = torch.randn(M, K, generator=gen)
        w = torch.randn(N, K, generator=gen)
        bias = torch.randn(N, generator=gen)
        q8, q4 = accel.ops.quantize(w, 8), accel.ops.quantize(w, 4, 32, "minmax")
        step = x.abs().amax(1, keepdim=True) / 127  # the activations as the int8 product quantizes them, in float32
        x_hat = torch.round(x / step).clamp(-127, 127) * step
        w8, w4 = accel.ops.dequantize(q8), accel.ops.dequantize(q4)
        fast = [accel.ops.quant_matmul(x.to(device), q.to(device), bias.to(device)).cpu() for q in (q8, q4)]
        in_float32 = [F.linear(x_hat, w8, bias), F.linear(x, w4, bias)]
        in_float64 = [F.linear(x_hat.double(), w8.double(), bias.double()), F.linear(x.double(), w4.double(), bias.double())]
        yield from compare("quant_matmul", f"{M}x{N}x{K}", ["int8", "int4 weight-only"], fast, in_float32, in_float64)
