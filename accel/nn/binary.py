"""accel.nn.BinaryLinear: a Linear layer with binary weights (and activations) that is really faster at inference.

Training keeps latent float weights: the forward uses sign(W) (and sign(x)) through accel.ops.binarize, whose
estimator (STE, clipped STE or ReSTE) carries the gradient to the latent values, times a scale (XNOR-Net's
alpha = mean |W| per output row, or one scalar for the whole matrix). In eval mode the same function runs on
packed bits through accel.ops.binary_linear (XOR + popcount): the weights are packed once and cached until they
change. ``pack()`` makes that permanent: the latent weights are dropped and the module keeps 1 bit per weight
(32x fewer bytes than float32); the weights are frozen from then on, and the input and the bias still get their
gradients (the input's through the estimator, as in training), so layers around a packed one can train.
"""

import torch
import torch.nn.functional as F

from accel.nn.packed_linear import PackedLinear
from accel.ops._checks import is_real
from accel.ops import binarize, pack_bits, unpack_bits
from accel.ops.binarize import ESTIMATORS
from accel.ops.binary_matmul import binary_linear
from accel.reference.binary import reste_power

SCALES = ("channel", "scalar", "none")


class BinaryLinear(PackedLinear):
    """(..., in_features) -> (..., out_features): y = (sign(x) sign(W)^T) * scale + bias.

    Args:
        in_features, out_features, bias: as nn.Linear (whose state_dict loads into this module).
        estimator: "reste" (default), "clipped" or "ste": the gradient of sign() in training.
        scale: "channel" (mean |W| per output row), "scalar" (mean |W| of the matrix) or "none".
        binarize_input: binarize the activations too (else they stay real and only the weights are binary;
            then inference runs as a float product with the binarized weights, with no packed kernel).
        o_end, t, delta: ReSTE's final power, threshold and interval. Call ``set_progress(epoch / epochs)``
            each epoch to follow the paper's cosine schedule of the power from 1 to o_end.

    state_dict keys: ``weight`` and ``bias`` (nn.Linear's) with latent weights; ``weight_bits``, ``weight_scale``
    (unless scale="none") and ``bias`` once packed; either loads into either kind of layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, estimator: str = "reste",
                 scale: str = "channel", binarize_input: bool = True, o_end: float = 3.0, t: float = 1.5,
                 delta: float = 0.1, device=None, dtype=None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"BinaryLinear: `estimator` must be one of {ESTIMATORS}, got {estimator!r}")
        if scale not in SCALES:
            raise ValueError(f"BinaryLinear: `scale` must be one of {SCALES}, got {scale!r}")
        # binarize checks o, t and delta on every call; here they are the constructor's to name
        if not (is_real(o_end) and o_end >= 1):
            raise ValueError(f"BinaryLinear: `o_end` must be a finite number >= 1, got {o_end!r}")
        if not (is_real(t) and t > 0):
            raise ValueError(f"BinaryLinear: `t` must be a finite number > 0, got {t!r}")
        if not (is_real(delta) and delta > 0 and (delta < t or estimator != "reste")):
            raise ValueError(f"BinaryLinear: `delta` must be a finite number > 0, below `t` ({t}) for ReSTE, got "
                             f"{delta!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.estimator, self.scale, self.binarize_input = estimator, scale, binarize_input
        self.o, self.o_end, self.t, self.delta = 1.0, o_end, t, delta

    def set_progress(self, progress: float) -> None:
        """Sets ReSTE's power o for a fraction `progress` in [0, 1] of training (cosine from 1 to o_end)."""
        self.o = reste_power(min(max(float(progress), 0.0), 1.0), self.o_end)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x)
        if self.packed or (not self.training and self.binarize_input):
            return self._packed_forward(x)
        if self.binarize_input:
            x = binarize(x, self.estimator, o=self.o, t=self.t, delta=self.delta)
        w = binarize(self.weight, self.estimator, o=self.o, t=self.t, delta=self.delta)
        y = F.linear(x, w)
        if self.scale != "none":
            y = y * self._weight_scale(self.weight)
        return y if self.bias is None else y + self.bias

    @property
    def packed_names(self) -> tuple:
        return ("weight_bits",) if self.scale == "none" else ("weight_bits", "weight_scale")

    def dequantized_weight(self) -> torch.Tensor:
        """sign(W) * scale (out_features, in_features) float32: the weights the packed signs stand for."""
        bits, scale = self._packed_weight()
        return self.weight_from_packed({"weight_bits": bits, "weight_scale": scale})

    def packed_state(self, weight: torch.Tensor) -> dict:
        state = {"weight_bits": pack_bits(weight)}
        if self.scale != "none":
            state["weight_scale"] = self._weight_scale(weight).float()
        return state

    def weight_from_packed(self, buffers: dict) -> torch.Tensor:
        signs = unpack_bits(buffers["weight_bits"], self.in_features)
        scale = buffers.get("weight_scale")
        return signs if scale is None else signs * scale.reshape(-1, 1)

    def _weight_scale(self, weight):
        return weight.abs().mean(dim=1) if self.scale == "channel" else weight.abs().mean()

    def _packed_weight(self):
        if self.packed:
            return self.weight_bits, self.weight_scale
        return self._cached(lambda: (pack_bits(self.weight),
                                     self._weight_scale(self.weight).float() if self.scale != "none" else None))

    def _packed_forward(self, x):
        bits, scale = self._packed_weight()
        return _FrozenBinaryProduct.apply(x, self.bias, bits, scale, self)

    def pack(self) -> "BinaryLinear":
        """Drops the latent weights and keeps their packed signs (and the scale), 1 bit per weight: the weights are
        frozen."""
        if not self.binarize_input:
            raise RuntimeError("BinaryLinear.pack: a layer with real inputs (binarize_input=False) has no packed kernel")
        if self.packed:
            return self
        bits, scale = self._packed_weight()
        return self._keep_only(weight_bits=bits, weight_scale=scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"estimator={self.estimator}, scale={self.scale}" + (", packed" if self.packed else ""))


class _FrozenBinaryProduct(torch.autograd.Function):
    """The packed product sign(x) sign(W)^T * scale + bias with the weights frozen: x gets the gradient through the
    layer's estimator of sign(x) and the binary weights, the bias its own."""

    @staticmethod
    def forward(ctx, x, bias, bits, scale, layer):
        ctx.save_for_backward(x, bits, scale)
        ctx.layer, ctx.bias_dtype = layer, None if bias is None else bias.dtype
        float_bias = None if bias is None else bias.detach().float()
        return binary_linear(x.float(), bits, layer.in_features, scale=scale, bias=float_bias).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, bits, scale = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            scaled = grad.float() if scale is None else grad.float() * scale
            grad_signs = (scaled @ unpack_bits(bits, layer.in_features)).to(x.dtype)
            grad_x = torch.ops.accel.binarize_backward(grad_signs, x, layer.estimator, float(layer.o), float(layer.t),
                                                      float(layer.delta))
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None
