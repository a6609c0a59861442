"""accel.ops.hopfield_energy: the energy the Hopfield update decreases (Ramsauer et al., 2020, eq. 2),

    E(xi) = -1/beta logsumexp(beta X^T xi) + 1/2 xi^T xi + 1/beta log N + 1/2 M^2,   M = max_i ||x_i||,

for many state patterns at once. One matrix product and one log-sum-exp: PyTorch's own kernels, with autograd.
"""
import math

import torch
from torch import Tensor


def energy_from_lse(lse: Tensor, xi: Tensor, norms: Tensor, count: Tensor, beta) -> Tensor:
    """E from the row log-sum-exps lse (..., L) of beta xi X^T, the state patterns xi (..., L, d), the stored
    patterns' norms (..., N) (0 for those left out) and their count (...,)."""
    M = norms.amax(-1)
    return -lse / beta + 0.5 * (xi * xi).sum(-1) + (torch.log(count) / beta + 0.5 * M * M).unsqueeze(-1)


def hopfield_energy(xi: Tensor, X: Tensor, beta: float | Tensor) -> Tensor:
    """E for state patterns xi (..., L, d) against stored patterns X (..., N, d) (leading dims broadcast):
    returns (..., L)."""
    for name, t in (("xi", xi), ("X", X)):
        if not isinstance(t, Tensor):
            raise TypeError(f"hopfield_energy: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2 or not t.dtype.is_floating_point:
            raise ValueError(f"hopfield_energy: `{name}` must be a floating-point (..., rows, d) tensor, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    if X.dtype != xi.dtype or X.device != xi.device:
        raise TypeError(f"hopfield_energy: `X` must have `xi`'s dtype and device ({xi.dtype} on {xi.device}), got "
                        f"{X.dtype} on {X.device}")
    if xi.shape[-1] != X.shape[-1] or X.shape[-2] == 0:
        raise ValueError(f"hopfield_energy: `X` must have shape (..., N >= 1, {xi.shape[-1]}), got {tuple(X.shape)}")
    try:
        torch.broadcast_shapes(xi.shape[:-2], X.shape[:-2])
    except RuntimeError:
        raise ValueError(f"hopfield_energy: the leading dimensions of `X` {tuple(X.shape[:-2])} and `xi` "
                         f"{tuple(xi.shape[:-2])} do not broadcast") from None
    if not isinstance(beta, Tensor) and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"hopfield_energy: `beta` must be a finite number > 0 or a tensor, got {beta!r}")
    lse = torch.logsumexp(beta * xi @ X.transpose(-1, -2), dim=-1)
    count = torch.full(X.shape[:-2], float(X.shape[-2]), dtype=X.dtype, device=X.device)
    return energy_from_lse(lse, xi, X.norm(dim=-1), count, beta)
