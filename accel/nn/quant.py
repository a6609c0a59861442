"""accel.nn.QuantLinear, accel.quantize_ and the distillation loss for training quantized students.

QuantLinear trains with fake quantization: the forward uses the weights quantized as inference will use them
(accel.ops.quantize), and the straight-through estimator passes the gradient to the float weights. In eval mode it
runs accel.ops.quant_matmul on the packed codes, cached until the weights change; ``pack()`` drops the float weights
for good. ``accel.quantize_(model, ...)`` swaps a model's nn.Linear layers for packed QuantLinears in place, in
torchao's style.
"""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from accel.ops import dequantize, quant_matmul, quantize
from accel.ops.quantize import QuantizedWeight, check_options


class QuantLinear(nn.Module):
    """(..., in_features) -> (..., out_features) with weights of ``bits`` bits.

    Args:
        bits: 8 (symmetric per output channel, activations quantized per row inside the product), 4 or 2 (minmax
            groups of ``group_size`` along the input, float activations).
        group_size: values per quantization group for 4 and 2 bits (a multiple of 32, 64 for 2 bits); ignored for 8.
        scheme: "symmetric" or "minmax"; default as above.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, group_size: int = 128,
                 scheme: str | None = None, device=None, dtype=None):
        super().__init__()
        scheme = scheme or ("symmetric" if bits == 8 else "minmax")
        group_size = None if bits == 8 else group_size
        check_options("QuantLinear", bits, group_size, scheme)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scheme = bits, group_size, scheme
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._cache = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.load_state_dict(linear.state_dict())
        return layer

    @property
    def packed(self) -> bool:
        return self.weight is None

    def quantized_weight(self) -> QuantizedWeight:
        """The packed weights: cached until the float weights change."""
        if self.packed:
            padded_features = self.weight_codes.shape[1] * 8 // self.bits
            return QuantizedWeight(self.weight_codes, self.weight_step, self.weight_offset, self.bits,
                                   padded_features // self.weight_step.shape[1], self.scheme, self.in_features)
        version = (self.weight.data_ptr(), self.weight._version)
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, quantize(self.weight.detach().float(), self.bits, self.group_size, self.scheme))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: expected {self.in_features} input features, got shape {tuple(x.shape)}")
        if self.packed or not self.training:
            return quant_matmul(x, self.quantized_weight(), self.bias)
        w_hat = dequantize(self.quantized_weight()).to(self.weight.dtype)
        w = self.weight + (w_hat - self.weight).detach()  # straight-through: forward w_hat, gradient to weight
        if self.bits == 8:  # the activations as the int8 product will see them
            x_hat = dequantize(quantize(x.detach().reshape(-1, x.shape[-1]).float(), 8)).reshape(x.shape).to(x.dtype)
            x = x + (x_hat - x).detach()
        return F.linear(x, w, self.bias)

    def pack(self) -> "QuantLinear":
        """Drops the float weights and keeps the packed codes, steps and offsets: inference only."""
        if self.packed:
            return self
        qw = self.quantized_weight()
        del self.weight
        self.weight = None
        self.register_buffer("weight_codes", qw.codes)
        self.register_buffer("weight_step", qw.step)
        self.register_buffer("weight_offset", qw.offset)
        self._cache = None
        return self.eval()

    def train(self, mode: bool = True):
        if mode and self.packed:
            raise RuntimeError("QuantLinear: a packed layer has no float weights to train")
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, scheme={self.scheme}" +
                (", packed" if self.packed else ""))


def quantize_(model: nn.Module, bits: int = 8, group_size: int = 128,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replaces, in place, every nn.Linear of ``model`` (those for which filter_fn(module, name) is true) by a packed
    QuantLinear with its weights; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and (filter_fn is None or filter_fn(child, full)):
                setattr(module, child_name, QuantLinear.from_linear(child, bits=bits, group_size=group_size).pack())
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    """Hinton et al.'s distillation loss, as Polino et al. train quantized students: alpha T^2 KL(softmax(t / T) ||
    softmax(s / T)) + (1 - alpha) cross-entropy with the labels (when given)."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=-1), log_target=True,
                    reduction="batchmean") * temperature ** 2
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)
