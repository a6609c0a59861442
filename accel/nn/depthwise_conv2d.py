"""accel.nn.DepthwiseConv2d: a drop-in nn.Conv2d(C, C, k, groups=C, bias=False) on accel.ops.depthwise_conv2d."""
import torch
from torch import nn

from accel.ops import depthwise_conv2d
from accel.ops._checks import check_count
from accel.ops.depthwise_conv2d import check_geometry


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, kernel_size, stride, padding, dilation, groups=C, bias=False)`` with the same
    parameter and state_dict key (``weight``), computed by accel.ops.depthwise_conv2d where its fast backward
    applies (float32 and float64, 4-D input) and by nn.Conv2d otherwise."""

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1):
        check_count("DepthwiseConv2d", "channels", channels)
        for size in (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size):
            check_count("DepthwiseConv2d", "kernel_size", size)
        check_geometry(stride, padding, dilation, "DepthwiseConv2d")
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=False)

    @staticmethod
    def replaces(conv: nn.Module) -> bool:
        """Whether ``conv`` is a depthwise nn.Conv2d this module computes identically."""
        return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing ``conv``'s weight Parameter (no copy). The random state is left as it was:
        the new module's own initial weight, replaced at once, must not consume draws, so that a network built
        from a seed gets the weights that the same network of nn.Conv2d gets."""
        with torch.random.fork_rng(devices=[]):
            module = cls(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        module.weight = conv.weight
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
            return super().forward(x)
        return depthwise_conv2d(x, self.weight, self.stride, self.padding, self.dilation)


def use_depthwise_kernels(module: nn.Module) -> nn.Module:
    """Replaces, in place, every depthwise nn.Conv2d inside ``module`` by a DepthwiseConv2d sharing its weight;
    parameters, buffers and state_dict keys are unchanged. Returns ``module``."""
    for name, child in module.named_children():
        if DepthwiseConv2d.replaces(child):
            setattr(module, name, DepthwiseConv2d.from_conv(child))
        else:
            use_depthwise_kernels(child)
    return module
