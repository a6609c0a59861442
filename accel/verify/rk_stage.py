"""Verification cases for accel.ops.rk_stage against rk_step's stage input g = y + h sum_j a_j k_j, float64."""
import torch

import accel.ops
from accel.reference import ode

# (B, D, row of the DOPRI5 tableau): the solver's size, odd sizes, a long row
CASES = [(256, 32, 6), (7, 33, 3), (33, 1, 1), (3, 1100, 5)]


def _reference(y0, k, h, a):
    return y0 + h[:, None] * sum(aj * k[j] for j, aj in enumerate(a))


def _forward_and_grads(fn, tensors, a, grad):
    y0, k, h = tensors
    g = fn(y0, k, h, a)
    return [g, *torch.autograd.grad(g, [y0, k, h], grad)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for B, D, row in CASES:
        a = list(ode.DOPRI5.a[row])
        data = [torch.randn(B, D, generator=gen, dtype=torch.float64),
                torch.randn(7, B, D, generator=gen, dtype=torch.float64),
                torch.rand(B, generator=gen, dtype=torch.float64) * 0.2]
        grad = torch.randn(B, D, generator=gen, dtype=torch.float64)
        results = []
        for fn, dev, dtype in ((accel.ops.rk_stage, device, torch.float32), (_reference, "cpu", torch.float32),
                               (_reference, "cpu", torch.float64)):
            leaves = [t.to(dev, dtype).requires_grad_() for t in data]
            results.append(_forward_and_grads(fn, leaves, a, grad.to(dev, dtype)))
        yield from compare("rk_stage", f"{B}x{D} DOPRI5 row {row}", ["g", "grad y0", "grad k", "grad h"], *results)
