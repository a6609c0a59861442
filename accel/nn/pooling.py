"""Max and average pooling computed on a channels-last copy of a contiguous (N, C, H, W) CPU input.

PyTorch's CPU pooling kernels vectorise over channels only for channels-last inputs; on (N, C, H, W) they walk
one window at a time. Pooling the channels-last copy and returning a contiguous result gives bit-identical
outputs and gradients (the same windows in the same scan order, the same rule for ties and NaN) in less time,
both copies included, at the search networks' shapes. The modules are nn.MaxPool2d and nn.AvgPool2d otherwise
(no parameters, no state)."""
import torch
from torch import nn


def _channels_last(forward, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return forward(x)
    return forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class MaxPool2d(nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_last(super().forward, x)


class AvgPool2d(nn.AvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_last(super().forward, x)


def use_channels_last_pooling(module: nn.Module) -> nn.Module:
    """Replaces, in place, every nn.MaxPool2d (without return_indices) and nn.AvgPool2d inside ``module`` by the
    classes above with the same settings; parameters, buffers and state_dict keys are unchanged. Returns
    ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.MaxPool2d and not child.return_indices:
            setattr(module, name, MaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                            ceil_mode=child.ceil_mode))
        elif type(child) is nn.AvgPool2d:
            setattr(module, name, AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode,
                                            child.count_include_pad, child.divisor_override))
        else:
            use_channels_last_pooling(child)
    return module
