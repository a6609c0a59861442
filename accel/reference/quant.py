"""Uniform quantization for quantized matmul, written as plainly as the papers.

Two schemes, each over groups (buckets) of consecutive values along the last dimension:
- "minmax" (Polino et al., 2018, bucket size 256): with s = 2^bits levels and the bucket's min and max,
      q = round((x - min) / (max - min) * (s - 1)),   x_hat = q / (s - 1) * (max - min) + min,
  i.e. q in [0, s - 1], x_hat = q * step + min with step = (max - min) / (s - 1);
- "symmetric" (absmax): q = round(x / step) in [-(2^(bits-1) - 1), 2^(bits-1) - 1], step = max |x| / (2^(bits-1) - 1),
  x_hat = q * step; one group per row is the usual per-output-channel int8 weight, and per-row dynamic
  quantization of activations.
Training goes through the rounding with the straight-through estimator: d x_hat / d x = 1. Polino et al.'s code
also differentiates through each group's step and offset, which are functions of the group's extreme values
(fake_quantize_through_scale).

Products: with weights quantized along K and activations x,
    y_n = sum_k x_k w_hat_nk = sum_groups (step_g sum_k x_k q_k + min_g sum_k x_k),
and for int8 both ways, y_mn = step_x,m step_w,n sum_k qx_mk qw_nk.
"""
import math

import torch


def levels(bits: int, scheme: str) -> tuple[int, int]:
    """The smallest and largest integer code of a scheme."""
    if scheme == "minmax":
        return 0, 2 ** bits - 1
    top = 2 ** (bits - 1) - 1
    return -top, top


def quantize(x: torch.Tensor, bits: int, group_size: int | None, scheme: str):
    """Codes q (integers, as float64), steps and offsets (min; 0 for symmetric) of x (..., K) over groups of
    group_size values along the last dimension (None: the whole row). K must be a multiple of group_size."""
    K = x.shape[-1]
    g = K if group_size is None else group_size
    groups = x.double().unflatten(-1, (K // g, g))
    low, high = levels(bits, scheme)
    if scheme == "minmax":
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (hi - lo) / high
        q = torch.where(step > 0, torch.round((groups - lo) / torch.where(step > 0, step, 1.0)), 0.0)
        offset = lo
    else:
        step = groups.abs().amax(-1, keepdim=True) / high
        q = torch.where(step > 0, torch.round(groups / torch.where(step > 0, step, 1.0)), 0.0)
        offset = torch.zeros_like(step)
    return q.clamp(low, high).flatten(-2), step.squeeze(-1), offset.squeeze(-1)


def dequantize(q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x_hat = q * step + offset, the steps and offsets per group along the last dimension."""
    groups = q.double().unflatten(-1, (step.shape[-1], -1))
    return (groups * step.double().unsqueeze(-1) + offset.double().unsqueeze(-1)).flatten(-2)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int | None, scheme: str) -> torch.Tensor:
    """x_hat, in x's dtype."""
    return dequantize(*quantize(x, bits, group_size, scheme)).to(x.dtype)


def fake_quantize_through_scale(x: torch.Tensor, bits: int, group_size: int | None, scheme: str) -> torch.Tensor:
    """fake_quantize's x_hat in float64, differentiable as Polino et al. train it: the rounding passes the gradient
    straight through, and the step and offset are computed from the group's values by autograd (min and max, or
    max |x|; the gradient of a max goes to its first position), so the values that set them get a gradient too."""
    K = x.shape[-1]
    g = K if group_size is None else group_size
    groups = x.double().unflatten(-1, (K // g, g))
    low, high = levels(bits, scheme)
    if scheme == "minmax":
        offset = groups.min(-1, keepdim=True).values
        step = (groups.max(-1, keepdim=True).values - offset) / high
    else:
        offset = torch.zeros_like(groups[..., :1])
        step = groups.abs().max(-1, keepdim=True).values / high
    u = (groups - offset) / torch.where(step > 0, step, 1.0)
    q = u + (torch.round(u).clamp(low, high) - u).detach()
    return torch.where(step > 0, q * step + offset, groups).flatten(-2)


def int8_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic int8: x (M, K) per row and w (N, K) per output channel, symmetric; the product of the codes
    in float64 (exact), scaled back."""
    qx, sx, _ = quantize(x, 8, None, "symmetric")
    qw, sw, _ = quantize(w, 8, None, "symmetric")
    out = (qx @ qw.T) * sx * sw.T
    return out if bias is None else out + bias.double()


def weight_only_linear(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Float activations against minmax-quantized weights, in float64."""
    out = x.double() @ dequantize(*quantize(w, bits, group_size, "minmax")).T
    return out if bias is None else out + bias.double()


def quantize_to_points(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Polino et al.'s differentiable quantization: each value of x becomes the nearest of the learnable
    quantization points (the lower one at a tie). Through autograd, a point's gradient is the sum of the
    gradients of the values that became it. Distances are taken in float64, where those of narrower values are
    exact: rounded to x's dtype, two of them can tie where one point is nearer."""
    ordered = points.sort().values  # so that argmin's first minimum is the lower point
    distances = (x.unsqueeze(-1).to(torch.float64) - ordered.to(torch.float64)).abs()
    # every distance of +inf is inf: its nearest point is the largest (the first of equal ones), as x grows
    nearest = torch.where(x == math.inf, ordered.argmax(), distances.argmin(-1))
    return torch.where(x.isnan(), x, ordered[nearest])  # a NaN has no nearest point
