"""Binarized matmul and the estimators that train through sign(), written as plainly as the papers.

Values in {-1, +1} are stored as bits, one per value, 32 to an int32 word, lowest bit first: bit 1 for x < 0,
so 0 maps to +1 (as sign(x) does here; torch.sign(0) is 0). For two such vectors of length K,

    a . b = (number of agreeing positions) - (number of disagreeing ones) = K - 2 popcount(a XOR b),

and the padding bits past K, 0 in both operands, XOR to 0 and add nothing.

XNOR-Net (Rastegari et al., 2016) scales a binarized weight row by alpha = mean |W| of that row, the scale that
minimises ||W - alpha sign(W)||; a single scalar scale for the whole matrix is the other common choice.

Training goes through sign() with an estimator of its gradient (the backward uses g(x) in place of sign'(x) = 0):
- STE (Bengio et al., 2013; BinaryConnect): g = 1;
- clipped STE (Hubara et al., 2016): g = 1 for |x| <= 1, else 0;
- ReSTE (Wu et al., ICCV 2023): the derivative of the power function f_o(x) = sign(x) |x|^(1/o), which tends
  to sign(x) as o grows: g = (1/o) |x|^(1/o - 1) for delta < |x| <= t, the slope of the secant of f_o over
  [0, delta] (delta^(1/o - 1)) for |x| <= delta, which keeps the gradient finite at 0, and 0 for |x| > t.
  o follows a cosine schedule from 1 (g = 1 within t: a clipped STE) to o_end = 3; t = 1.5, delta = 0.1.
"""
import math

import torch

WORD_BITS = 32


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 for x >= 0, -1 for x < 0."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def words(k: int) -> int:
    """Words that hold k bits."""
    return (k + WORD_BITS - 1) // WORD_BITS


def pack_bits(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sign bits of x along dim packed into int32 words: (..., K, ...) -> (..., words(K), ...)."""
    x = x.movedim(dim, -1)
    K = x.shape[-1]
    bits = (x < 0).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, words(K) * WORD_BITS - K)).unflatten(-1, (words(K), WORD_BITS))
    value = (bits << torch.arange(WORD_BITS, device=x.device)).sum(-1)  # 0 .. 2^32 - 1
    value = torch.where(value >= 2 ** 31, value - 2 ** 32, value)  # the same 32 bits as an int32
    return value.to(torch.int32).movedim(-1, dim)


def unpack_bits(packed: torch.Tensor, k: int, dim: int = -1, dtype=torch.float32) -> torch.Tensor:
    """The inverse of pack_bits: (..., words, ...) -> (..., k, ...) values in {-1, +1}."""
    packed = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    bits = (packed.unsqueeze(-1) >> torch.arange(WORD_BITS, device=packed.device)) & 1
    values = 1.0 - 2.0 * bits.flatten(-2)[..., :k].to(dtype)
    return values.movedim(-1, dim)


def binary_matmul(a: torch.Tensor, b: torch.Tensor, scale=None, bias=None) -> torch.Tensor:
    """sign(a) sign(b)^T for a (M, K), b (N, K), as float64 (exact integers); then times scale ((N,) or a
    number) and plus bias (N,) when given."""
    out = sign(a.double()) @ sign(b.double()).T
    if scale is not None:
        out = out * (scale.double() if isinstance(scale, torch.Tensor) else scale)
    if bias is not None:
        out = out + bias.double()
    return out


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's alpha: mean |W| of each output row of w (N, K)."""
    return w.abs().mean(dim=1)


def ste_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x)


def clipped_ste_grad(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() <= 1).to(x.dtype)


def reste_grad(x: torch.Tensor, o: float, t: float = 1.5, delta: float = 0.1) -> torch.Tensor:
    """ReSTE's g(x) (see the module docstring)."""
    a = x.abs()
    inner = (1.0 / o) * a.clamp_min(delta) ** (1.0 / o - 1.0)
    near_zero = torch.full_like(x, delta ** (1.0 / o - 1.0))
    g = torch.where(a <= delta, near_zero, inner)
    return torch.where(a <= t, g, torch.zeros_like(x))


def reste_power(progress: float, o_end: float = 3.0) -> float:
    """ReSTE's o at a fraction `progress` in [0, 1] of training: a cosine ramp from 1 to o_end."""
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi * progress)) / 2.0
