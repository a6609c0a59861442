"""The numerics rule every fast op is judged by (DESIGN.md, "Numerics").

The reference runs in float64 on the CPU. A fast op computing in dtype D passes when its error against
that reference is at most twice the error of the reference itself run in D, plus a small floor.

Errors are absolute errors in units of the output's scale, max|x - ref| / max(max|ref|, operand_scale), so that
a gradient of magnitude 1e-3 and an activation of magnitude 1e3 are judged alike. ``operand_scale`` is the
magnitude of the terms the output is computed from (the inputs', times the upstream gradient's for a gradient):
an output that is zero or tiny next to them, a sum that cancels, is judged by the rounding those terms allow,
not relative to its own size. A zero reference with no operand scale accepts only an exact zero.

Non-finite values must match exactly: NaN where the reference has NaN, and an infinity of the same sign.
"""
from dataclasses import dataclass

import torch

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def scaled_error(x: torch.Tensor, ref64: torch.Tensor, operand_scale: float = 0.0) -> float:
    """max|x - ref64| / max(max|ref64|, operand_scale), in float64 on the CPU; inf where a non-finite value does
    not match the reference's (NaN against NaN, inf against an inf of the same sign)."""
    if not operand_scale >= 0:
        raise ValueError(f"scaled_error: `operand_scale` must be a number >= 0, got {operand_scale!r}")
    x = x.detach().to("cpu", torch.float64)
    ref64 = ref64.detach().to("cpu", torch.float64)
    if x.shape != ref64.shape:
        raise ValueError(f"shape {tuple(x.shape)} against reference shape {tuple(ref64.shape)}")
    if x.numel() == 0:
        return 0.0
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(torch.isnan(x), torch.isnan(ref64)):
        return float("inf")
    infinite = torch.isinf(ref64)
    if not torch.equal(x[infinite], ref64[infinite]):
        return float("inf")
    if not finite.any():
        return 0.0
    diff = (x - ref64)[finite].abs().max().item()
    scale = max(ref64[finite].abs().max().item(), operand_scale)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def operand_scale(*tensors) -> float:
    """The largest magnitude among the finite values of the tensors given (None and non-tensors are skipped): the
    size of the terms an elementwise or short sum of them is made of."""
    top = 0.0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and (t.is_floating_point() or t.is_complex()):
            values = t.detach().abs()
            values = values[torch.isfinite(values)]
            if values.numel():
                top = max(top, values.max().item())
    return top


def farthest(candidates, reference64: torch.Tensor) -> torch.Tensor:
    """Of several computations of one output in a dtype (draws of a reference's error there: other orders of its
    sums, other roundings of its inputs), the one farthest from the float64 reference. One draw is often near 0 on
    outputs of few numbers or that cancel, so the rule's yardstick is the largest of several."""
    return max(candidates, key=lambda c: scaled_error(c, reference64, 1.0))  # any positive scale orders alike


@dataclass
class Verdict:
    error: float  # the fast op's scaled error against the float64 reference
    allowed: float  # factor * (the reference's own error in the same dtype) + floor
    reference_error: float

    @property
    def ok(self) -> bool:
        # a non-finite error (a NaN or inf where the float64 reference has none) fails even where the reference
        # itself overflows in the dtype
        return self.error <= self.allowed and self.error != float("inf")


def judge(fast: torch.Tensor, reference_in_dtype: torch.Tensor, reference64: torch.Tensor,
          factor: float = 2.0, scale: float = 0.0) -> Verdict:
    """Applies the rule to one output: ``fast`` and ``reference_in_dtype`` both computed in fast's dtype, and
    ``scale`` the operands' magnitude (see operand_scale) below which errors are judged absolutely."""
    ref_err = scaled_error(reference_in_dtype, reference64, scale)
    return Verdict(scaled_error(fast, reference64, scale), factor * ref_err + FLOOR[fast.dtype], ref_err)
