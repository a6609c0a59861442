"""DARTS' search space (Liu et al., 2019), written as plainly as the paper: the candidate operations
of an edge and the eager mixed operation over them.

An edge (i, j) of a search cell carries every candidate o in O at once and mixes them:

    o_bar(x) = sum_{o in O} w_o * o(x),      w = softmax(alpha_(i,j))      (paper, eq. 2)

The operations follow quark0/darts (cnn/operations.py, cnn/model_search.py): ReLU-Conv-BN ordering,
BatchNorm with affine=False during search, pooling followed by a BatchNorm(affine=False), and the
same module and attribute names, so that the state_dict keys of this MixedOp are DARTS' own.
"""
import torch
from torch import nn

# DARTS' candidate set O, in DARTS' order (cnn/genotypes.py): the index of a name is its column in alpha.
PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]


class Zero(nn.Module):
    """The 'none' operation: no connection. Multiplying by 0 keeps the shape (strided at stride 2) and dtype."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Module):
    """skip_connect at stride 1."""

    def forward(self, x):
        return x


class ReLUConvBN(nn.Module):
    """ReLU -> Conv -> BN; the cell's input preprocessing (1x1)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    """ReLU -> dilated depthwise conv -> pointwise conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    """A depthwise-separable conv applied twice (DARTS' sep_conv): the first carries the stride."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing every other pixel: two 1x1 stride-2 convs, the second on the
    input shifted by one pixel, concatenated along channels. Needs even H and W, as DARTS does."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2 != 0:
            raise ValueError(f"FactorizedReduce: `C_out` must be even, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


# Builders by name: (C, stride, affine) -> module, as DARTS' OPS table (the 8 searched names only).
OPS = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}


def search_ops(C: int, stride: int, primitives=PRIMITIVES) -> nn.ModuleList:
    """The candidate operations of one search edge, as DARTS builds them: affine=False everywhere, and a
    BatchNorm(affine=False) after each pooling so that its scale matches the parametric branches'."""
    ops = nn.ModuleList()
    for primitive in primitives:
        if primitive not in OPS:
            raise ValueError(f"unknown DARTS primitive {primitive!r}; known: {sorted(OPS)}")
        op = OPS[primitive](C, stride, False)
        if "pool" in primitive:
            op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
        ops.append(op)
    return ops


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """PC-DARTS' channel shuffle: the channels in `groups` groups, interleaved (channel g*C/groups + j goes
    to j*groups + g)."""
    N, C, H, W = x.shape
    return x.view(N, groups, C // groups, H, W).transpose(1, 2).contiguous().view(N, C, H, W)


class MixedOp(nn.Module):
    """DARTS' eager mixed operation: every candidate runs, and ``forward(x, weights) = sum_o w_o * o(x)``.

    With ``partial_channels`` K > 1 it is PC-DARTS' (Xu et al., 2020) partial-channel edge: the candidates
    see only the first C/K channels, the rest bypass them (max-pooled 2x2 when the edge reduces), and the
    concatenation is channel-shuffled in K groups.
    """

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, partial_channels: int = 1):
        super().__init__()
        self._k = partial_channels
        if partial_channels > 1:
            self.mp = nn.MaxPool2d(2, 2)
        self._ops = search_ops(C // partial_channels, stride, primitives)

    def forward(self, x, weights, index=None):
        """``index``: GDAS' (Dong & Yang, 2019) hard sampling, with ``weights`` straight-through one-hot:
        only the sampled candidate runs; the others add their weight (0 in value) so that their gradient
        still flows."""
        if index is None:
            terms = (w * op(x[:, :x.shape[1] // self._k]) for w, op in zip(weights, self._ops))
        else:
            terms = (w * op(x[:, :x.shape[1] // self._k]) if k == index else w
                     for k, (w, op) in enumerate(zip(weights, self._ops)))
        mixed = sum(terms)
        if self._k == 1:
            return mixed
        bypass = x[:, x.shape[1] // self._k:]
        if mixed.shape[2] != x.shape[2]:
            bypass = self.mp(bypass)
        return channel_shuffle(torch.cat([mixed, bypass], dim=1), self._k)
