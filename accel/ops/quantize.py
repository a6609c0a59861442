"""accel.ops.quantize: uniform quantization of weights into packed integer codes (accel/reference/quant.py), its
inverse, and fake quantization with the straight-through estimator for training.

Codes are packed along the input dimension K: int8 as they are; 4 bits two to a byte and 2 bits four to a byte,
in blocks of 32 (4 bits) or 64 (2 bits) codes where byte j holds codes j, j + 16 (, j + 32, j + 48), so a kernel
gets them in order with masks and shifts. K is padded to a whole number of groups by repeating each row's last
value, which leaves every group's min, max and absmax as they were; the padded codes meet zero-padded activations
in the products and add nothing.
"""
from dataclasses import dataclass
import math

import torch
from torch import Tensor

from accel.ops._library import lib
from accel.reference import quant as reference

lib.define("fake_quantize(Tensor x, int bits, int group_size, str scheme) -> Tensor")

SCHEMES = ("symmetric", "minmax")
BITS = (8, 4, 2)
CODES_PER_BLOCK = {8: 32, 4: 32, 2: 64}


@dataclass
class QuantizedWeight:
    """A (N, K) weight as packed codes: codes (N, Kp) int8 for symmetric 8 bits, (N, Kp * bits / 8) uint8 otherwise; step
    and offset (N, Kp / group_size) float32, x_hat = code * step + offset."""
    codes: Tensor
    step: Tensor
    offset: Tensor
    bits: int
    group_size: int
    scheme: str
    in_features: int

    @property
    def padded_features(self) -> int:
        return self.step.shape[1] * self.group_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.step, self.offset))

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.step.to(device), self.offset.to(device), self.bits,
                               self.group_size, self.scheme, self.in_features)


def check_options(op: str, bits, group_size, scheme):
    if not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{op}: `bits` must be one of {BITS}, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: `scheme` must be one of {SCHEMES}, got {scheme!r}")
    block = CODES_PER_BLOCK[bits]
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or group_size % block):
        raise ValueError(f"{op}: `group_size` must be a positive multiple of {block} for {bits} bits (or None: one "
                         f"group per row), got {group_size!r}")


def check_quantized_weight(op: str, name: str, qw) -> None:
    """That ``qw`` is a QuantizedWeight whose fields agree: codes of the dtype and width its bits pack to, and step
    and offset, one per group, on the codes' device."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{op}: `{name}` must be a QuantizedWeight from accel.ops.quantize, got {type(qw).__name__}")
    check_options(f"{op}: `{name}`", qw.bits, qw.group_size, qw.scheme)
    codes, step, offset = qw.codes, qw.step, qw.offset
    dtype = torch.int8 if qw.bits == 8 and qw.scheme == "symmetric" else torch.uint8
    if not all(isinstance(t, Tensor) for t in (codes, step, offset)) or codes.dtype != dtype or codes.dim() != 2 \
            or step.dim() != 2 or step.shape != offset.shape or step.shape[0] != codes.shape[0] \
            or not step.dtype.is_floating_point or offset.dtype != step.dtype \
            or codes.shape[1] * 8 != step.shape[1] * qw.group_size * qw.bits or qw.in_features > qw.padded_features:
        raise ValueError(f"{op}: `{name}` is not a consistent QuantizedWeight: codes (N, Kp * bits / 8) {dtype}, step "
                         f"and offset (N, Kp / group_size) floating, in_features <= Kp")
    if step.device != codes.device or offset.device != codes.device:
        raise ValueError(f"{op}: `{name}`'s codes, step and offset must be on one device, got {codes.device}, "
                         f"{step.device} and {offset.device}")


def _padded(w: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, int]:
    block = CODES_PER_BLOCK[bits]
    K = w.shape[1]
    G = group_size if group_size is not None else math.ceil(K / block) * block
    Kp = math.ceil(K / G) * G
    return torch.cat([w, w[:, -1:].expand(-1, Kp - K)], dim=1) if Kp > K else w, G


def quantize(w: Tensor, bits: int = 8, group_size: int | None = None, scheme: str = "symmetric") -> QuantizedWeight:
    """Quantizes the rows of w (N, K) over groups of ``group_size`` values along K (None: one group per row):
    ``scheme`` "symmetric" (absmax) or "minmax" (Polino et al.'s buckets). Returns a QuantizedWeight."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.dtype.is_floating_point or w.shape[1] == 0:
        raise ValueError("quantize: `w` must be a 2-D floating-point tensor (out_features, in_features >= 1), got "
                         f"{(w.dtype, tuple(w.shape)) if isinstance(w, Tensor) else type(w).__name__}")
    check_options("quantize", bits, group_size, scheme)
    K = w.shape[1]
    padded, G = _padded(w.detach(), bits, group_size)
    q, step, offset = reference.quantize(padded, bits, G, scheme)
    low, _ = reference.levels(bits, scheme)
    return QuantizedWeight(_pack(q, bits, low), step.float(), offset.float(), bits, G, scheme, K)


def _pack(q: Tensor, bits: int, low: int) -> Tensor:
    if bits == 8:  # symmetric codes as int8, minmax ones (0 .. 255) as uint8
        return q.to(torch.int8 if low < 0 else torch.uint8)
    codes = (q - low).to(torch.uint8)  # 0 .. 2^bits - 1
    per_byte = 8 // bits
    block = CODES_PER_BLOCK[bits]
    parts = codes.unflatten(1, (-1, per_byte, block // per_byte))  # (N, blocks, per_byte, 16)
    packed = torch.zeros(parts.shape[:2] + parts.shape[3:], dtype=torch.uint8, device=q.device)
    for p in range(per_byte):
        packed |= parts[:, :, p] << (bits * p)
    return packed.flatten(1)


def unpack_codes(qw: QuantizedWeight) -> Tensor:
    """The integer codes (N, Kp) of a QuantizedWeight, as int32 (the scheme's range)."""
    if qw.bits == 8:
        return qw.codes.to(torch.int32)
    per_byte = 8 // qw.bits
    packed = qw.codes.unflatten(1, (-1, CODES_PER_BLOCK[qw.bits] // per_byte)).to(torch.int32)
    parts = [(packed >> (qw.bits * p)) & (2 ** qw.bits - 1) for p in range(per_byte)]
    low, _ = reference.levels(qw.bits, qw.scheme)
    return torch.stack(parts, dim=2).flatten(1) + low


def dequantize(qw: QuantizedWeight) -> Tensor:
    """x_hat (N, K) float32."""
    check_quantized_weight("dequantize", "qw", qw)
    return reference.dequantize(unpack_codes(qw), qw.step, qw.offset).float()[:, :qw.in_features]


def fake_quantize(x: Tensor, bits: int = 8, group_size: int | None = None, scheme: str = "symmetric") -> Tensor:
    """dequantize(quantize(x)) over the rows of x (..., K), differentiable with the straight-through estimator
    (the gradient passes unchanged). K must be a multiple of group_size."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"fake_quantize: `x` must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fake_quantize: `x` must have shape (..., K >= 1), got {tuple(x.shape)}")
    check_options("fake_quantize", bits, group_size, scheme)
    if group_size is not None and x.shape[-1] % group_size:
        raise ValueError(f"fake_quantize: `x`'s last dimension ({x.shape[-1]}) must be a multiple of `group_size` "
                         f"({group_size})")
    return torch.ops.accel.fake_quantize(x, bits, group_size or 0, scheme)


def _fake_quantize_kernel(x, bits, group_size, scheme):
    return reference.fake_quantize(x, bits, group_size or None, scheme)


lib.impl("fake_quantize", _fake_quantize_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("accel::fake_quantize")
def _fake(x, bits, group_size, scheme):
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    return grad, None, None, None


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd("accel::fake_quantize", _straight_through, setup_context=_no_context)
