"""Verification cases for accel.ops.depthwise_conv2d: DARTS' sep/dil conv geometries and odd sizes."""
import torch

import accel.ops
from accel.reference import depthwise_conv2d as reference

# (N, C, H, W, kernel, stride, padding, dilation)
CASES = [(2, 3, 8, 8, 3, 1, 1, 1), (3, 5, 9, 7, 5, 1, 2, 1), (2, 4, 11, 13, 3, 1, 2, 2), (1, 2, 17, 33, 5, 1, 4, 2),
         (2, 3, 9, 9, 3, 2, 1, 1)]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for N, C, H, W, k, stride, padding, dilation in CASES:
        x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
        w = torch.randn(C, 1, k, k, generator=gen, dtype=torch.float64)
        geometry = (stride, padding, dilation)
        grad = torch.randn(reference.depthwise_conv2d(x, w, *geometry).shape, generator=gen, dtype=torch.float64)
        for dtype in (torch.float32, torch.float64):
            results = []
            for fn, dev, dt in ((accel.ops.depthwise_conv2d, device, dtype), (reference.depthwise_conv2d, "cpu", dtype),
                                (reference.depthwise_conv2d, "cpu", torch.float64)):
                xs = x.to(dev, dt).requires_grad_()
                ws = w.to(dev, dt).requires_grad_()
                out = fn(xs, ws, *geometry)
                results.append([out, *torch.autograd.grad(out, [xs, ws], grad.to(dev, dt))])
            case = f"{N}x{C}x{H}x{W} k{k} s{stride} p{padding} d{dilation}"
            yield from compare("depthwise_conv2d", case, ["out", "grad x", "grad weight"], *results)
