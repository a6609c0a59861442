"""Verification cases for accel.ops.krylov_kernel against the definition (L mat-vecs), on HiPPO systems."""
import math

import torch

import accel.ops
from accel.reference import lssl as reference

# (H, N, M, L, measure)
CASES = [(4, 16, 1, 1000, "legs"), (3, 8, 2, 257, "legt"), (2, 32, 1, 4096, "fout")]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for H, N, M, L, measure in CASES:
        A, B = reference.hippo(measure, N)
        dt = torch.exp(torch.rand(H, generator=gen, dtype=torch.float64) * math.log(100.0) + math.log(1e-3))
        dA, dB = reference.discretize(A, B, dt)
        C = torch.randn(H, M, N, generator=gen, dtype=torch.float64)
        grad = torch.randn(H, M, L, generator=gen, dtype=torch.float64)
        results = []
        for fn, dev, dtype in ((accel.ops.krylov_kernel, device, torch.float32),
                               (reference.krylov_naive, "cpu", torch.float32),
                               (reference.krylov_naive, "cpu", torch.float64)):
            inputs = [t.to(dev, dtype).requires_grad_() for t in (dA, dB, C)]
            K = fn(*inputs, L)
            results.append([K, *torch.autograd.grad(K, inputs, grad.to(dev, dtype))])
        yield from compare("krylov_kernel", f"H={H} N={N} M={M} L={L} {measure}",
                           ["K", "grad dA", "grad dB", "grad C"], *results)
