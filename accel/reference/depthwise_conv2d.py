"""Depthwise 2-D convolution, the spatial half of DARTS' separable and dilated convolutions.

Each channel c is filtered by its own kernel w_c (no mixing across channels):

    out[n, c, i, j] = sum_{a, b} w[c, 0, a, b] * x[n, c, i*s - p + a*d, j*s - p + b*d]

with stride s, zero padding p and dilation d (per spatial dimension). It is
``F.conv2d(x, w, stride=s, padding=p, dilation=d, groups=C)``.
"""
import torch
import torch.nn.functional as F


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1) -> torch.Tensor:
    return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])
