"""The numerics rule every fast op is judged by (DESIGN.md, "Numerics").

The reference runs in float64 on the CPU. A fast op computing in dtype D passes when its error against
that reference is at most twice the error of the reference itself run in D, plus a small floor.
Errors are measured relative to the reference's scale: max|x - ref| / max(max|ref|, tiny), so that a
gradient of magnitude 1e-3 and an activation of magnitude 1e3 are judged alike.
"""
from dataclasses import dataclass

import torch

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def scaled_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |x - ref64| / max|ref64|, computed in float64 on the CPU; inf where x is not finite but ref64 is."""
    x = x.detach().to("cpu", torch.float64)
    ref64 = ref64.detach().to("cpu", torch.float64)
    if x.shape != ref64.shape:
        raise ValueError(f"shape {tuple(x.shape)} against reference shape {tuple(ref64.shape)}")
    if x.numel() == 0:
        return 0.0
    if not torch.equal(torch.isfinite(x), torch.isfinite(ref64)):
        return float("inf")
    finite = torch.isfinite(ref64)
    diff = (x - ref64)[finite].abs().max() if finite.any() else torch.tensor(0.0, dtype=torch.float64)
    scale = ref64[finite].abs().max() if finite.any() else torch.tensor(1.0, dtype=torch.float64)
    return (diff / scale.clamp_min(1e-300)).item()


@dataclass
class Verdict:
    error: float  # the fast op's scaled error against the float64 reference
    allowed: float  # 2 * (the reference's own error in the same dtype) + floor
    reference_error: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed


def judge(fast: torch.Tensor, reference_in_dtype: torch.Tensor, reference64: torch.Tensor,
          factor: float = 2.0) -> Verdict:
    """Applies the rule to one output: ``fast`` and ``reference_in_dtype`` both computed in fast's dtype."""
    ref_err = scaled_error(reference_in_dtype, reference64)
    return Verdict(scaled_error(fast, reference64), factor * ref_err + FLOOR[fast.dtype], ref_err)
