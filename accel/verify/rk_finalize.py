"""Verification cases for accel.ops.rk_finalize against accel.reference.ode.error_norm and .stiffness, float64."""
import torch

import accel.ops
from accel.reference import ode

# (B, D, tableau, rtol, atol): the solver's size, odd sizes, a long row
CASES = [(256, 32, ode.DOPRI5, 1e-6, 1e-8), (7, 33, ode.TSIT5, 1e-3, 1e-6), (33, 1, ode.DOPRI5, 1e-4, 0.0),
         (3, 1100, ode.BOSH3, 1e-5, 1e-7)]


def _reference(y0, y1, k, g_prev, h, b_err, rtol, atol):
    err = h[:, None] * sum(bi * k[i] for i, bi in enumerate(b_err))
    return ode.error_norm(err, y0, y1, rtol, atol), ode.stiffness(k, torch.stack([g_prev, y1]))


def _forward_and_grads(fn, leaves, constants, grads):
    outputs = fn(*leaves, *constants)
    return [*outputs, *torch.autograd.grad(outputs, leaves, grads)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for B, D, tableau, rtol, atol in CASES:
        s = len(tableau.b_err)
        y0 = torch.randn(B, D, generator=gen, dtype=torch.float64)
        data = [y0, y0 + 0.1 * torch.randn(B, D, generator=gen, dtype=torch.float64),
                torch.randn(s, B, D, generator=gen, dtype=torch.float64),
                y0 + 0.1 * torch.randn(B, D, generator=gen, dtype=torch.float64),
                torch.rand(B, generator=gen, dtype=torch.float64) * 0.1 + 0.01]
        grads = [torch.rand(B, generator=gen, dtype=torch.float64) for _ in range(2)]
        constants = (list(tableau.b_err), rtol, atol)
        results = []
        for fn, dev, dtype in ((accel.ops.rk_finalize, device, torch.float32), (_reference, "cpu", torch.float32),
                               (_reference, "cpu", torch.float64)):
            leaves = [t.to(dev, dtype).requires_grad_() for t in data]
            results.append(_forward_and_grads(fn, leaves, constants, [g.to(dev, dtype) for g in grads]))
        names = ["error_norm", "stiffness", "grad y0", "grad y1", "grad k", "grad g_prev", "grad h"]
        yield from compare("rk_finalize", f"{B}x{D} s={s} rtol={rtol:g} atol={atol:g}", names, *results)
