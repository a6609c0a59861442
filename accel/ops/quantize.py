"""accel.ops.quantize: uniform quantization of weights into packed integer codes (accel/reference/quant.py), its
inverse, and fake quantization for training, with the straight-through estimator or Polino et al.'s gradient through
the groups' scales.

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

lib.define("fake_quantize(Tensor x, int bits, int group_size, str scheme, str gradient) -> Tensor")

SCHEMES = ("symmetric", "minmax")
BITS = (8, 4, 2)
CODES_PER_BLOCK = {8: 32, 4: 32, 2: 64}
GRADIENTS = ("straight_through", "scale")


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


def pad_to_groups(w: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, int]:
    """w (N, K) padded to whole groups by repeating each row's last value (differentiable), and the group size."""
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
    padded, G = pad_to_groups(w.detach(), bits, group_size)
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


def fake_quantize(x: Tensor, bits: int = 8, group_size: int | None = None, scheme: str = "symmetric",
                  gradient: str = "straight_through") -> Tensor:
    """dequantize(quantize(x)) over the rows of x (..., K); K must be a multiple of group_size.

    gradient: "straight_through" passes the gradient unchanged; "scale" adds what Polino et al.'s code
    backpropagates through each group's step and offset into the values that set them (the group's max and min,
    or its largest |x|; accel.reference.quant.fake_quantize_through_scale). No value lies outside its group's
    range, so a straight-through estimator truncated to the range would pass the same gradient as the plain one.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"fake_quantize: `x` must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fake_quantize: `x` must have shape (..., K >= 1), got {tuple(x.shape)}")
    check_options("fake_quantize", bits, group_size, scheme)
    if group_size is not None and x.shape[-1] % group_size:
        raise ValueError(f"fake_quantize: `x`'s last dimension ({x.shape[-1]}) must be a multiple of `group_size` "
                         f"({group_size})")
    if gradient not in GRADIENTS:
        raise ValueError(f"fake_quantize: `gradient` must be one of {GRADIENTS}, got {gradient!r}")
    return torch.ops.accel.fake_quantize(x, bits, group_size or 0, scheme, gradient)


def _fake_quantize_kernel(x, bits, group_size, scheme, gradient):
    # steps and offsets rounded as quantize() stores them (float32, or x's dtype when wider), so that the value is
    # what the packed weights give
    q, step, offset = reference.quantize(x, bits, group_size or None, scheme)
    kept = torch.promote_types(x.dtype, torch.float32)
    return reference.dequantize(q, step.to(kept), offset.to(kept)).to(x.dtype)


lib.impl("fake_quantize", _fake_quantize_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("accel::fake_quantize")
def _fake(x, bits, group_size, scheme, gradient):
    return torch.empty_like(x)


def _through_scale(grad: Tensor, x: Tensor, bits: int, group_size: int, scheme: str) -> Tensor:
    """The "scale" gradient's extra term. With the rounding straight through, x_hat_j = step q_j + offset gives
    d x_hat_j / d step = q_j - t_j, t_j = (x_j - offset) / step, and d x_hat_j / d offset = 0 (the offset's direct
    term cancels the one through t_j). So dL/d step = sum_j g_j (q_j - t_j), and step = (max - min) / high passes
    it over high to the group's max and minus it to its min; step = max |x| / high to the largest |x|, signed."""
    K = x.shape[-1]
    G = group_size or K
    groups = x.detach().double().unflatten(-1, (K // G, G))
    q, step, offset = reference.quantize(x.detach(), bits, group_size or None, scheme)
    q, step, offset = q.unflatten(-1, (K // G, G)), step.unsqueeze(-1), offset.unsqueeze(-1)
    t = (groups - offset) / torch.where(step > 0, step, 1.0)
    per_step = (grad.double().unflatten(-1, (K // G, G)) * (q - t)).sum(-1, keepdim=True)
    d_top = torch.where(step > 0, per_step, 0.0) / reference.levels(bits, scheme)[1]
    out = torch.zeros_like(groups)
    if scheme == "minmax":
        out.scatter_add_(-1, groups.argmax(-1, keepdim=True), d_top)
        out.scatter_add_(-1, groups.argmin(-1, keepdim=True), -d_top)
    else:
        top = groups.abs().argmax(-1, keepdim=True)
        out.scatter_add_(-1, top, d_top * groups.gather(-1, top).sign())
    return out.flatten(-2).to(grad.dtype)


def _fake_quantize_backward(ctx, grad):
    if ctx.gradient == "scale":
        x, = ctx.saved_tensors
        grad = grad + _through_scale(grad, x, *ctx.options)
    return grad, None, None, None, None


def _save_for_scale(ctx, inputs, output):
    x, bits, group_size, scheme, gradient = inputs
    ctx.options, ctx.gradient = (bits, group_size, scheme), gradient
    if gradient == "scale":
        ctx.save_for_backward(x)


torch.library.register_autograd("accel::fake_quantize", _fake_quantize_backward, setup_context=_save_for_scale)
