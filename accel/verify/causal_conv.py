"""Verification cases for accel.ops.causal_conv against the FFT reference run in float64."""
import torch

import accel.ops
from accel.reference import lssl as reference

# (B, L, H, M, activation, bidirectional)
CASES = [(2, 1000, 5, 1, "gelu", False), (3, 77, 17, 2, None, True), (1, 4096, 3, 1, "gelu", True)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for B, L, H, M, activation, bidirectional in CASES:
        u = torch.randn(B, L, H, generator=gen, dtype=torch.float64)
        K = torch.randn(H, M, L, generator=gen, dtype=torch.float64) * torch.exp(-torch.arange(L) / 100.0)
        D = torch.randn(H, M, generator=gen, dtype=torch.float64)
        Kr = K.flip(0).clone() if bidirectional else None
        grad = torch.randn(B, L, H, M, generator=gen, dtype=torch.float64)
        results = []
        for fn, dev, dtype in ((accel.ops.causal_conv, device, torch.float32),
                               (reference.causal_conv, "cpu", torch.float32),
                               (reference.causal_conv, "cpu", torch.float64)):
            uu, KK, DD = (t.to(dev, dtype).requires_grad_() for t in (u, K, D))
            y = fn(uu, KK, DD, activation, Kr.to(dev, dtype) if Kr is not None else None)
            results.append([y, *torch.autograd.grad(y, [uu, KK, DD], grad.to(dev, dtype))])
        yield from compare("causal_conv", f"{B}x{L}x{H} M={M} {activation or 'linear'}"
                           f"{' bidirectional' if bidirectional else ''}", ["y", "grad u", "grad K", "grad D"], *results)
