"""PackedLinear: what BinaryLinear and QuantLinear share. Float weights train (nn.Linear's parameters, initialised
and loaded as nn.Linear's); inference runs on a packed form of them, made once and cached until the weights change;
``pack()`` keeps only the packed form (the float weights are dropped): the weights are frozen from then on, in train
mode as in eval (a model with packed layers and trainable ones around them trains), and the input and the bias
still get their gradients."""
import math

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        if not (isinstance(in_features, int) and in_features > 0 and isinstance(out_features, int) and out_features > 0):
            raise ValueError(f"{name}: `in_features` and `out_features` must be positive ints")
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._cache = None  # (weight version, packed form)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A layer with an nn.Linear's weights as its float weights."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.load_state_dict(linear.state_dict())
        return layer

    @property
    def packed(self) -> bool:
        return self._parameters.get("weight") is None

    @property
    def weight(self):
        """The float weights (the trainable parameter); once packed, the weights the packed form stands for,
        dequantized at each read and not kept, for torch's own code that reads ``.weight`` (nn.MultiheadAttention
        reads its out_proj's). They come as a DequantizedWeight, which makes torch's fused fast paths
        (nn.TransformerEncoderLayer's, nn.MultiheadAttention's) step aside, so that the packed layers' own products
        run."""
        weight = self._parameters.get("weight")
        if weight is not None:
            return weight
        return self.dequantized_weight().as_subclass(DequantizedWeight)

    # the packed form's buffers, by name (a subclass's), and its conversions to and from float weights
    packed_names: tuple = ()

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def packed_state(self, weight: torch.Tensor) -> dict:
        raise NotImplementedError

    def weight_from_packed(self, buffers: dict) -> torch.Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Checkpoints load both ways: a float one (``weight``, as nn.Linear's) into a packed layer, packed on load;
        a packed one (the packed buffers) into a layer with float weights, dequantized on load."""
        weight_key = prefix + "weight"
        packed_keys = {name: prefix + name for name in self.packed_names}
        has_packed = all(key in state_dict for key in packed_keys.values())
        if self.packed and weight_key in state_dict and not has_packed:
            weight = state_dict.pop(weight_key)
            state_dict.update({prefix + name: value for name, value in self.packed_state(weight).items()})
        elif not self.packed and has_packed and weight_key not in state_dict:
            buffers = {name: state_dict.pop(key) for name, key in packed_keys.items()}
            state_dict[weight_key] = self.weight_from_packed(buffers).to(self._parameters["weight"].dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _cached(self, make):
        """make() of the current float weights, made again only when they change. A compiled graph makes it in the
        graph instead: it cannot compare data pointers, and it reads the weights as they are at each call."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return make()
        weight = self._parameters["weight"]
        version = (weight.data_ptr(), weight._version)
        if self._cache is None or self._cache[0] != version:
            with torch.no_grad():
                self._cache = (version, make())
        return self._cache[1]

    def _keep_only(self, **buffers) -> "PackedLinear":
        """Drops the float weights for these buffers (the packed form): the weights are frozen from then on."""
        self._parameters["weight"] = None
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self._cache = None
        return self.eval()

    def _check_features(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}: `x` must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: `x` must have {self.in_features} input features, got shape "
                             f"{tuple(x.shape)}")


def float_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every packed layer's buffers replaced by its dequantized ``weight``: a checkpoint
    that the float model (nn.Linear in place of each packed layer) loads."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and module.packed:
            prefix = f"{name}." if name else ""
            for buffer in module.packed_names:
                state.pop(prefix + buffer, None)
            state[prefix + "weight"] = module.dequantized_weight()
    return state


class DequantizedWeight(torch.Tensor):
    """A packed layer's weights, dequantized: a plain tensor to every function (they see through it, and return
    plain tensors), but one that torch's fused fast paths decline, since it overrides __torch_function__."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
