"""Verification cases for accel.ops.batch_norm_mix against the eager sum of BatchNorm2d(affine=False) modules."""
import copy

import torch
from torch import nn

import accel.ops

CASES = [(4, (2, 3, 8, 8)), (3, (3, 5, 7, 9)), (4, (64, 16, 32, 32))]


def checks(device, compare):
    gen = torch.Generator().manual_seed(0)
    for K, shape in CASES:
        for training in (True, False):
            # Channel means away from 0, as convolution outputs have: variances must not cancel.
            zs = [torch.randn(shape, generator=gen, dtype=torch.float64) + 4.0 for _ in range(K)]
            w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
            grad = torch.randn(shape, generator=gen, dtype=torch.float64)
            norms = [nn.BatchNorm2d(shape[1], affine=False) for _ in range(K)]
            results = []
            for variant in ("fast", "eager32", "eager64"):
                bns = copy.deepcopy(norms)
                dtype = torch.float64 if variant == "eager64" else torch.float32
                dev = device if variant == "fast" else "cpu"
                for bn in bns:
                    bn.to(dev, dtype).train(training)
                zv = [z.to(dev, dtype).requires_grad_() for z in zs]
                wv = w.to(dev, dtype).requires_grad_()
                if variant == "fast":
                    out = accel.ops.batch_norm_mix(zv, wv, bns)
                else:
                    out = sum(wv[k] * bn(z) for k, (z, bn) in enumerate(zip(zv, bns)))
                grads = torch.autograd.grad(out, [*zv, wv], grad.to(dev, dtype))
                results.append([out, grads[0], grads[-1], bns[0].running_mean, bns[-1].running_var])
            case = f"{K} x {'x'.join(map(str, shape))} {'train' if training else 'eval'}"
            yield from compare("batch_norm_mix", case,
                               ["out", "grad zs[0]", "grad weights", "running_mean", "running_var"], *results)
