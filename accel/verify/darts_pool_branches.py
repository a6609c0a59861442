"""Verification cases for accel.ops.darts_pool_branches against DARTS' eager pool + BatchNorm branches."""
import copy

import torch
from torch import nn

import accel.ops

SHAPES = [(2, 3, 8, 8), (3, 5, 7, 9), (4, 16, 32, 32)]


def _branches(C):
    return (nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(C, affine=False)),
            nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.BatchNorm2d(C, affine=False)))


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for training in (True, False):
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.1
            grad = torch.randn(shape, generator=gen, dtype=torch.float64)
            branches = _branches(shape[1])
            results = []
            for variant in ("fast", "eager32", "eager64"):
                max_b, avg_b = copy.deepcopy(branches)
                dtype = torch.float64 if variant == "eager64" else torch.float32
                dev = device if variant == "fast" else "cpu"
                for b in (max_b, avg_b):
                    b.to(dev, dtype).train(training)
                xs = x.to(dev, dtype).requires_grad_()
                ws = w.to(dev, dtype).requires_grad_()
                if variant == "fast":
                    out = accel.ops.darts_pool_branches(xs, ws, max_b[1], avg_b[1])
                else:
                    out = ws[0] * max_b(xs) + ws[1] * avg_b(xs)
                results.append([out, *torch.autograd.grad(out, [xs, ws], grad.to(dev, dtype)),
                                max_b[1].running_var, avg_b[1].running_mean])
            case = f"{'x'.join(map(str, shape))} {'train' if training else 'eval'}"
            yield from compare("darts_pool_branches", case,
                               ["out", "grad x", "grad weights", "max running_var", "avg running_mean"], *results)
