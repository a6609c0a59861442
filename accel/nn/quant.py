"""accel.nn.QuantLinear, accel.quantize_ and the distillation loss for training quantized students.

QuantLinear trains with fake quantization: the forward uses the weights quantized as inference will use them
(accel.ops.fake_quantize), and the straight-through estimator, or Polino et al.'s gradient through the groups'
scales, passes the gradient to the float weights. In eval mode it
runs accel.ops.quant_matmul on the packed codes, cached until the weights change; ``pack()`` drops the float weights
for good. ``accel.quantize_(model, ...)`` swaps a model's nn.Linear layers for packed QuantLinears in place, in
torchao's style.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from accel.ops import dequantize, fake_quantize, quant_matmul, quantize
from accel.nn.packed_linear import PackedLinear
from accel.ops._checks import check_count, is_real
from accel.ops.quantize import CODES_PER_BLOCK, GRADIENTS, QuantizedWeight, pad_to_groups, check_options


class QuantLinear(PackedLinear):
    """(..., in_features) -> (..., out_features) with weights of ``bits`` bits.

    Args:
        bits: 8 (symmetric per output channel, activations quantized per row inside the product), 4 or 2 (minmax
            groups of ``group_size`` along the input, float activations).
        group_size: values per quantization group for 4 and 2 bits (a multiple of 32, 64 for 2 bits); ignored for 8.
        scheme: "symmetric" or "minmax"; default as above.
        gradient: how training differentiates the quantized weights: "straight_through" or "scale" (also
            through each group's step and offset, as Polino et al.; accel.ops.fake_quantize).

    state_dict keys: ``weight`` and ``bias`` (nn.Linear's) with float weights; ``weight_codes``, ``weight_step``,
    ``weight_offset`` and ``bias`` once packed. Either kind of checkpoint loads into either kind of layer (packed
    or dequantized on load); accel.nn.float_state_dict gives a packed model's checkpoint for the float model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, group_size: int = 128,
                 scheme: str | None = None, gradient: str = "straight_through", device=None, dtype=None):
        scheme = scheme or ("symmetric" if bits == 8 else "minmax")
        group_size = None if bits == 8 else group_size
        check_options("QuantLinear", bits, group_size, scheme)
        if gradient not in GRADIENTS:
            raise ValueError(f"QuantLinear: `gradient` must be one of {GRADIENTS}, got {gradient!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.bits, self.group_size, self.scheme, self.gradient = bits, group_size, scheme, gradient

    def quantized_weight(self) -> QuantizedWeight:
        """The packed weights: cached until the float weights change."""
        if self.packed:
            return self._from_buffers(self.weight_codes, self.weight_step, self.weight_offset)
        return self._cached(lambda: quantize(self.weight.float(), self.bits, self.group_size, self.scheme))

    packed_names = ("weight_codes", "weight_step", "weight_offset")

    def dequantized_weight(self) -> torch.Tensor:
        """W_hat (out_features, in_features) float32: the weights the codes stand for."""
        return dequantize(self.quantized_weight())

    def packed_state(self, weight: torch.Tensor) -> dict:
        qw = quantize(weight.float(), self.bits, self.group_size, self.scheme)
        return {"weight_codes": qw.codes, "weight_step": qw.step, "weight_offset": qw.offset}

    def weight_from_packed(self, buffers: dict) -> torch.Tensor:
        return dequantize(self._from_buffers(buffers["weight_codes"], buffers["weight_step"], buffers["weight_offset"]))

    def _from_buffers(self, codes, step, offset) -> QuantizedWeight:
        """The QuantizedWeight of packed buffers; their shapes give the group size."""
        group_size = codes.shape[1] * 8 // self.bits // step.shape[1]
        return QuantizedWeight(codes, step, offset, self.bits, group_size, self.scheme, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x)
        if self.packed or not self.training:
            return quant_matmul(x, self.quantized_weight(), self.bias)
        padded, G = pad_to_groups(self.weight, self.bits, self.group_size)  # as quantize() pads, differentiably
        w = fake_quantize(padded, self.bits, G, self.scheme, self.gradient)[:, :self.in_features]
        if self.bits == 8:  # the activations as the int8 product will see them
            x_hat = dequantize(quantize(x.detach().reshape(-1, x.shape[-1]).float(), 8)).reshape(x.shape).to(x.dtype)
            x = x + (x_hat - x).detach()
        return F.linear(x, w, self.bias)

    def pack(self) -> "QuantLinear":
        """Drops the float weights and keeps the packed codes, steps and offsets: the weights are frozen."""
        if self.packed:
            return self
        qw = self.quantized_weight()
        return self._keep_only(weight_codes=qw.codes, weight_step=qw.step, weight_offset=qw.offset)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, scheme={self.scheme}, gradient={self.gradient}" +
                (", packed" if self.packed else ""))


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig:
    """torchao's config name for accel's 8 bits: int8 weights per output channel, the activations quantized per row
    inside the product."""


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """torchao's config name for accel's 4 bits: minmax groups of ``group_size`` along the input, float
    activations."""
    group_size: int = 128


CONFIGS = (Int8DynamicActivationInt8WeightConfig, Int4WeightOnlyConfig)


def quantize_(model: nn.Module, bits=8, group_size=128, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              *, budget: float | None = None, calibration: Callable[[nn.Module], torch.Tensor] | None = None,
              probes: int = 16) -> nn.Module:
    """Replaces, in place, every nn.Linear of ``model`` (subclasses included; those for which filter_fn(module,
    name) is true) by a packed QuantLinear with its weights; returns the model.

    bits: 8, 4 or 2 for every layer; a config as torchao names them, ``quantize_(model, config, filter_fn)``
    (Int8DynamicActivationInt8WeightConfig(), Int4WeightOnlyConfig(group_size)); or "auto": each layer gets 8, 4
    or 2 bits from its sensitivity (HAWQ's Tr(H) / n * ||Q(W) - W||^2, with the Hessian trace of the loss
    ``calibration(model)`` estimated by Hutchinson's method over ``probes`` Rademacher vectors), lowering first the
    layers where the least sensitivity is added per bit saved, until the average bits per weight is at most
    ``budget``.
    """
    if isinstance(bits, CONFIGS):
        if callable(group_size) and filter_fn is None:  # torchao's third positional argument is filter_fn
            group_size, filter_fn = 128, group_size
        bits, group_size = (4, bits.group_size) if isinstance(bits, Int4WeightOnlyConfig) else (8, group_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: `model` must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):  # it swaps the Linears inside a model and cannot swap the model itself
        raise TypeError("quantize_: `model` is an nn.Linear itself; quantize_ replaces the Linears inside a model. "
                        "For one layer: QuantLinear.from_linear(linear, bits=...).pack()")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"quantize_: `filter_fn` must be callable as filter_fn(module, name), got {filter_fn!r}")
    if bits == "auto":
        if budget is None or calibration is None:
            raise ValueError("quantize_: bits='auto' needs a `budget` (average bits per weight) and a `calibration` loss")
        if not (is_real(budget) and budget > 0):
            raise ValueError(f"quantize_: `budget` must be a finite number of bits per weight > 0, got {budget!r}")
        check_count("quantize_", "probes", probes)
    elif not (isinstance(bits, int) and bits in (8, 4, 2)):
        raise ValueError(f"quantize_: `bits` must be 8, 4, 2, 'auto' or one of {[c.__name__ for c in CONFIGS]}, got "
                         f"{bits!r}")
    # nn.Linear and its subclasses (as torchao's filter: nn.MultiheadAttention's out_proj is one; the attention
    # reads its .weight, which a packed QuantLinear gives dequantized)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name))}
    if bits == "auto":
        chosen = assign_bits(model, linears, calibration, budget, group_size, probes)
    elif bits in (8, 4, 2):
        chosen = dict.fromkeys(linears, bits)
    else:
        raise ValueError(f"quantize_: `bits` must be 8, 4, 2 or 'auto', got {bits!r}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in chosen:
                setattr(module, child_name,
                        QuantLinear.from_linear(child, bits=chosen[full], group_size=group_size).pack())
    return model


def hessian_traces(model: nn.Module, linears: dict[str, nn.Linear], calibration: Callable[[nn.Module], torch.Tensor],
                   probes: int = 16) -> dict[str, float]:
    """Tr(d^2 loss / dW^2) for each layer's weight, by Hutchinson's estimator E[v^T H v], v with +-1 entries; H v is
    the gradient of (grad . v)."""
    weights = [m.weight for m in linears.values()]
    traces = dict.fromkeys(linears, 0.0)
    for _ in range(probes):
        grads = torch.autograd.grad(calibration(model), weights, create_graph=True)
        vs = [torch.randint_like(w, 2) * 2 - 1 for w in weights]
        hvs = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), weights)
        for name, v, hv in zip(linears, vs, hvs):
            traces[name] += (v * hv).sum().item() / probes
    return traces


def assign_bits(model, linears, calibration, budget: float, group_size: int, probes: int = 16) -> dict[str, int]:
    """Bits per layer for quantize_(bits="auto"): greedy from 8 bits down (see quantize_)."""
    traces = hessian_traces(model, linears, calibration, probes)
    sizes = {name: m.weight.numel() for name, m in linears.items()}

    def sensitivity(name, b):
        w = linears[name].weight.detach().float()
        qw = quantize(w, b, None if b == 8 else group_size, "symmetric" if b == 8 else "minmax")
        return max(traces[name], 0.0) / sizes[name] * (dequantize(qw) - w).pow(2).sum().item()

    lowest = 2 if group_size % CODES_PER_BLOCK[2] == 0 else 4  # 2-bit groups hold whole blocks of 64 codes
    chosen = dict.fromkeys(linears, 8)
    total = sum(sizes.values())
    while sum(chosen[n] * sizes[n] for n in chosen) / total > budget:
        options = [(n, chosen[n] // 2) for n in chosen if chosen[n] > lowest]
        if not options:
            break
        n, b = min(options, key=lambda o: (sensitivity(*o) - sensitivity(o[0], chosen[o[0]])) /
                   ((chosen[o[0]] - o[1]) * sizes[o[0]]))
        chosen[n] = b
    return chosen


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
