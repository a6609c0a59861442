"""Verification cases for accel.ops.hopfield_update against the float64 reference loop: outputs and the gradients
of q, k, v and beta, with stored patterns shared by the batch, key padding and the stopping rule."""
import torch

import accel.ops
from accel.reference import hopfield as reference

# (B, H, L, S, d, dv, steps, shared stored patterns, padded, eps)
CASES = [(2, 4, 33, 100, 64, 64, 0, False, False, None), (2, 4, 33, 100, 64, 32, 3, True, True, None),
         (1, 2, 64, 1000, 64, 64, 5, False, False, 1e-4), (3, 1, 7, 17, 9, 5, 2, False, True, 1e-3)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for B, H, L, S, d, dv, steps, shared, padded, eps in CASES:
        Bk = 1 if shared else B
        q = torch.randn(B, H, L, d, generator=gen, dtype=torch.float64)
        k = torch.randn(Bk, H, S, d, generator=gen, dtype=torch.float64)
        v = torch.randn(Bk, H, S, dv, generator=gen, dtype=torch.float64)
        beta = torch.tensor(d ** -0.5 * 2, dtype=torch.float64)
        padding = torch.rand(B, S, generator=gen) < 0.25 if padded else None
        if padding is not None:
            padding[:, 0] = False
        grad = torch.randn(B, H, L, dv, generator=gen, dtype=torch.float64)
        results = []
        for dev, dtype, fast in ((device, torch.float32, True), ("cpu", torch.float32, False),
                                 ("cpu", torch.float64, False)):
            leaves = [t.to(dev, dtype).requires_grad_() for t in (q, k, v, beta)]
            pad = padding.to(dev) if padding is not None else None
            if fast:
                out = accel.ops.hopfield_update(*leaves, steps, key_padding_mask=pad, eps=eps)
            else:
                mask = reference.additive_mask(pad, dtype=dtype)
                out = reference.hopfield_update(*leaves, steps, mask=mask, eps=eps)[0]
            results.append([out, *torch.autograd.grad(out, leaves, grad.to(dev, dtype))])
        case = f"{B}x{H}x{L}x{S} d={d} steps={steps}" + (" shared" if shared else "") + (" pad" if padded else "") \
            + (f" eps={eps:g}" if eps else "")
        yield from compare("hopfield_update", case, ["out", "grad q", "grad k", "grad v", "grad beta"], *results)
