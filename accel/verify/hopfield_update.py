"""Verification cases for accel.ops.hopfield_update against the float64 reference loop: outputs and the gradients
of q, k, v and beta, with stored patterns shared by the batch, key padding and the stopping rule."""
import torch

import accel.ops
from accel.numerics import farthest
from accel.reference import hopfield as reference

# (B, H, L, S, d, dv, steps, shared stored patterns, padded, eps)
CASES = [(2, 4, 33, 100, 64, 64, 0, False, False, None), (2, 4, 33, 100, 64, 32, 3, True, True, None),
         (1, 2, 64, 1000, 64, 64, 5, False, False, 1e-4), (3, 1, 7, 17, 9, 5, 2, False, True, 1e-3)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    orders = torch.Generator().manual_seed(1)  # apart, so that the cases' inputs do not depend on the draws
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
        def run(dev, dtype, fast, cols=None):
            """Outputs and gradients; with ``cols``, of the reference on the stored patterns in that order (the same
            function, rounded otherwise), put back in the original order."""
            order = torch.arange(S) if cols is None else cols
            leaves = [t.to(dev, dtype).requires_grad_() for t in (q, k, v, beta)]
            pad = padding[:, order].to(dev) if padding is not None else None
            if fast:
                out = accel.ops.hopfield_update(*leaves, steps, key_padding_mask=pad, eps=eps)
            else:
                mask = reference.additive_mask(pad, dtype=dtype)
                q_, k_, v_, b_ = leaves
                out = reference.hopfield_update(q_, k_[:, :, order], v_[:, :, order], b_, steps, mask=mask, eps=eps)[0]
            return [out, *torch.autograd.grad(out, leaves, grad.to(dev, dtype))]

        got, ref64 = run(device, torch.float32, True), run("cpu", torch.float64, False)
        # beta's gradient is one number: one float32 run of the reference is one draw of its error, often near 0;
        # its error is the largest of that run and three on permuted stored patterns
        draws = [run("cpu", torch.float32, False)]
        draws += [run("cpu", torch.float32, False, torch.randperm(S, generator=orders)) for _ in range(3)]
        ref32 = [farthest([d[i] for d in draws], r)
                 for i, r in enumerate(ref64)]
        case = f"{B}x{H}x{L}x{S} d={d} steps={steps}" + (" shared" if shared else "") + (" pad" if padded else "") \
            + (f" eps={eps:g}" if eps else "")
        yield from compare("hopfield_update", case, ["out", "grad q", "grad k", "grad v", "grad beta"], got, ref32,
                           ref64)
