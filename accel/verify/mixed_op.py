"""Verification cases for accel.ops.mixed_op: odd shapes, every dtype, both weighting modes."""
import torch

import accel.ops
from accel.reference import mixed_op as reference

CASES = [((7,), 3), ((33, 5), 8), ((4, 16, 9, 9), 8), ((1000,), 1)]


def _forward_and_grads(fn, ys, mix, grad):
    out = fn(ys, mix)
    return [out, *torch.autograd.grad(out, [*ys, mix], grad)]


def _leaves(tensors, dtype, device):
    return [t.detach().to(device, dtype).requires_grad_() for t in tensors]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for shape, K in CASES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for mode, tau in (("alpha", 0.7), ("weights", None)):
                ys = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(K)]
                mix = torch.randn(K, generator=gen, dtype=torch.float64)
                grad = torch.randn(shape, generator=gen, dtype=torch.float64)

                def fast(y, m):
                    return accel.ops.mixed_op(y, alpha=m, tau=tau) if mode == "alpha" else accel.ops.mixed_op(y, weights=m)

                def ref(y, m):
                    return reference.mixed_op(y, m, tau)

                *y_fast, m_fast = _leaves([*ys, mix], dtype, device)
                *y_d, m_d = _leaves([*ys, mix], dtype, "cpu")
                *y_64, m_64 = _leaves([*ys, mix], torch.float64, "cpu")
                names = ["out"] + [f"grad ys[{k}]" for k in range(K)] + [f"grad {mode}"]
                case = f"K={K} {tuple(shape)} {mode}"
                yield from compare(
                    "mixed_op", case, names,
                    _forward_and_grads(fast, y_fast, m_fast, grad.to(device, dtype)),
                    _forward_and_grads(ref, y_d, m_d, grad.to(dtype)),
                    _forward_and_grads(ref, y_64, m_64, grad),
                )
