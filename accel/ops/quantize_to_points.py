"""accel.ops.quantize_to_points: Polino et al.'s differentiable quantization, every value replaced by the nearest
of a set of learnable quantization points (accel.reference.quant.quantize_to_points).

Gradients: a point's gradient is the sum of the gradients of the values mapped to it (what trains the points);
the values get the straight-through gradient (it passes unchanged), so the weights can be trained through the
quantizer too. The kernel is ATen's: the points are sorted, each value finds its point by a binary search among
the sorted points (O(n log P) instead of the reference's O(n P) distance table), and the backward is one index_add.
It runs the same on every device, so there is no C++ or Triton kernel of its own.
"""
import torch
from torch import Tensor

from accel.ops._library import lib

lib.define("quantize_to_points(Tensor x, Tensor points) -> Tensor")
lib.define("quantize_to_points_backward(Tensor grad, Tensor x, Tensor points) -> Tensor")


def quantize_to_points(x: Tensor, points: Tensor) -> Tensor:
    """x_hat with x_hat[i] the point nearest to x[i] (the lower one at a tie).

    Args:
        x: values, any shape, floating point.
        points: (P,) quantization points of x's dtype and device, in any order (they move while they are learned).
    """
    for name, t in (("x", x), ("points", points)):
        if not isinstance(t, Tensor):
            raise TypeError(f"quantize_to_points: `{name}` must be a Tensor, got {type(t).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"quantize_to_points: `x` must be floating point, got {x.dtype}")
    if points.dim() != 1 or points.numel() == 0:
        raise ValueError(f"quantize_to_points: `points` must be a non-empty 1-D tensor, got shape {tuple(points.shape)}")
    if points.dtype != x.dtype or points.device != x.device:
        raise TypeError(f"quantize_to_points: `points` must have x's dtype and device ({x.dtype} on {x.device}), got "
                        f"{points.dtype} on {points.device}")
    return torch.ops.accel.quantize_to_points(x, points)


def _assignment(x, points):
    """The sorted points, the sort's order, and the index into the sorted points of each value's nearest one."""
    ordered, order = points.sort()
    # Not a search among the midpoints (a + b) / 2: rounded, one can fall on either side of the true midpoint, and
    # values next to it went to the farther point. Instead the two points around each value, by their distances
    # in float64 (the reference's: exact for narrower dtypes, where rounded distances can tie though one point is
    # nearer), the lower at a tie; of equal points the first, as the reference's argmin.
    largest = torch.searchsorted(ordered, ordered[-1:]).reshape(())  # the first of the points equal to the largest
    above = torch.searchsorted(ordered, x.contiguous(), side="left").clamp_max(largest)
    below = torch.searchsorted(ordered, ordered[(above - 1).clamp_min(0)], side="left")
    wide, wide_points = x.to(torch.float64), ordered.to(torch.float64)
    nearer_below = (wide - wide_points[below]).abs() <= (wide - wide_points[above]).abs()
    # +inf (both distances inf, a tie to the reference's argmin): the largest point; finite values keep the rule
    nearer_below &= torch.isfinite(wide - wide_points[above])
    return ordered, order, torch.where(nearer_below, below, above)


def _forward(x, points):
    ordered, _, nearest = _assignment(x, points)
    return torch.where(x.isnan(), x, ordered[nearest])  # a NaN has no nearest point (the search gives it the last)


def _backward(grad, x, points):
    """The points' gradient: the values' gradients summed per point (in the points' given order)."""
    _, order, nearest = _assignment(x, points)
    per_sorted = torch.zeros_like(points).index_add_(0, nearest.reshape(-1), grad.reshape(-1).to(points.dtype))
    return torch.empty_like(points).scatter_(0, order, per_sorted)


lib.impl("quantize_to_points", _forward, "CompositeExplicitAutograd")
lib.impl("quantize_to_points_backward", _backward, "CompositeExplicitAutograd")


@torch.library.register_fake("accel::quantize_to_points")
def _fake(x, points):
    return torch.empty_like(x)


@torch.library.register_fake("accel::quantize_to_points_backward")
def _backward_fake(grad, x, points):
    return torch.empty_like(points)


def _setup_context(ctx, inputs, output):
    x, points = inputs
    ctx.save_for_backward(x, points)


def _autograd_backward(ctx, grad):
    x, points = ctx.saved_tensors
    grad_points = torch.ops.accel.quantize_to_points_backward(grad, x, points) if ctx.needs_input_grad[1] else None
    return grad if ctx.needs_input_grad[0] else None, grad_points


torch.library.register_autograd("accel::quantize_to_points", _autograd_backward, setup_context=_setup_context)
