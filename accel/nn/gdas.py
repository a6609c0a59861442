"""GDAS' search network in the NASNet macro-structure (Dong and Yang, 2019; D-X-Y/AutoDL-Projects,
models/cell_searchs/search_model_gdas_nasnet.py) under that code's names, arguments, state_dict keys and outputs,
so that its search loop runs with only the import changed:
``NASNetworkGDAS(C, N, steps, multiplier, stem_multiplier, num_classes, search_space, affine,
track_running_stats)``, with ``get_weights()``, ``get_alphas()``, ``set_tau``/``get_tau``, ``show_alphas()``,
``genotype()`` (a dict) and ``forward`` returning (features, logits).

Each forward samples one operation per edge by the hard gumbel-softmax of the architecture logits (drawn as
that code draws them, normal then reduce), runs only that operation and scales it by its straight-through
weight. What differs is underneath: the depthwise convolutions of the separable convolutions run on
accel.ops.depthwise_conv2d (same parameter and key), the pools on channels-last copies (accel.nn.pooling), and
the sampled indices are read once per forward instead of once per edge.

The operations are the candidates of that code's search spaces (SEARCH_SPACES), built with its module layout:
ReLUConvBN, SepConv and DualSepConv hold an ``op`` Sequential (DualSepConv: ``op_a`` and ``op_b``), pooling a
``preprocess`` (when the channels change) and ``op``, FactorizedReduce ``convs`` (stride 2) or ``conv`` and ``bn``;
convolutions have a bias exactly when the BatchNorms are not affine.
"""
import torch
import torch.nn.functional as F
from torch import nn

from accel.nn.darts import edge_weights
from accel.nn.depthwise_conv2d import DepthwiseConv2d
from accel.nn.pooling import AvgPool2d, MaxPool2d

DARTS_SPACE = ["none", "skip_connect", "dua_sepc_3x3", "dua_sepc_5x5", "dil_sepc_3x3", "dil_sepc_5x5",
               "avg_pool_3x3", "max_pool_3x3"]
SEARCH_SPACES = {"darts": DARTS_SPACE}


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=not affine),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats))

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    """ReLU, a depthwise convolution (accel's kernel), a pointwise one, BatchNorm."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride=stride, padding=padding, dilation=dilation),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=not affine),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats))

    def forward(self, x):
        return self.op(x)


class DualSepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super().__init__()
        self.op_a = SepConv(C_in, C_in, kernel_size, stride, padding, dilation, affine, track_running_stats)
        self.op_b = SepConv(C_in, C_out, kernel_size, 1, padding, dilation, affine, track_running_stats)

    def forward(self, x):
        return self.op_b(self.op_a(x))


class Pooling(nn.Module):
    def __init__(self, C_in, C_out, stride, mode, affine=True, track_running_stats=True):
        super().__init__()
        self.preprocess = None if C_in == C_out else \
            ReLUConvBN(C_in, C_out, 1, 1, 0, 1, affine, track_running_stats)
        self.op = AvgPool2d(3, stride=stride, padding=1, count_include_pad=False) if mode == "avg" else \
            MaxPool2d(3, stride=stride, padding=1)

    def forward(self, x):
        return self.op(x if self.preprocess is None else self.preprocess(x))


class Zero(nn.Module):
    def __init__(self, C_in, C_out, stride):
        super().__init__()
        self.C_in, self.C_out, self.stride = C_in, C_out, stride

    def forward(self, x):
        if self.C_in == self.C_out:  # x times 0, as that code computes it (so a non-finite x gives NaN)
            return x[:, :, ::self.stride, ::self.stride].mul(0.0)
        return x.new_zeros(x.shape[0], self.C_out, *x.shape[2:])


class FactorizedReduce(nn.Module):
    """Stride 2: two 1x1 convolutions of stride 2, the second on the input shifted by one pixel, concatenated."""

    def __init__(self, C_in, C_out, stride, affine, track_running_stats):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"FactorizedReduce: `stride` must be 1 or 2, got {stride!r}")
        self.stride, self.C_in, self.C_out = stride, C_in, C_out
        self.relu = nn.ReLU(inplace=False)
        if stride == 2:
            self.convs = nn.ModuleList(nn.Conv2d(C_in, c, 1, stride=2, padding=0, bias=not affine)
                                       for c in (C_out // 2, C_out - C_out // 2))
            self.pad = nn.ConstantPad2d((0, 1, 0, 1), 0)
        else:
            self.conv = nn.Conv2d(C_in, C_out, 1, stride=1, padding=0, bias=not affine)
        self.bn = nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats)

    def forward(self, x):
        if self.stride == 2:
            x = self.relu(x)
            out = torch.cat([self.convs[0](x), self.convs[1](self.pad(x)[:, :, 1:, 1:])], dim=1)
        else:
            out = self.conv(x)
        return self.bn(out)


OPS = {
    "none": lambda C_in, C_out, stride, affine, stats: Zero(C_in, C_out, stride),
    "avg_pool_3x3": lambda C_in, C_out, stride, affine, stats: Pooling(C_in, C_out, stride, "avg", affine, stats),
    "max_pool_3x3": lambda C_in, C_out, stride, affine, stats: Pooling(C_in, C_out, stride, "max", affine, stats),
    "nor_conv_1x1": lambda C_in, C_out, stride, affine, stats: ReLUConvBN(C_in, C_out, 1, stride, 0, 1, affine, stats),
    "nor_conv_3x3": lambda C_in, C_out, stride, affine, stats: ReLUConvBN(C_in, C_out, 3, stride, 1, 1, affine, stats),
    "dua_sepc_3x3": lambda C_in, C_out, stride, affine, stats: DualSepConv(C_in, C_out, 3, stride, 1, 1, affine, stats),
    "dua_sepc_5x5": lambda C_in, C_out, stride, affine, stats: DualSepConv(C_in, C_out, 5, stride, 2, 1, affine, stats),
    "dil_sepc_3x3": lambda C_in, C_out, stride, affine, stats: SepConv(C_in, C_out, 3, stride, 2, 2, affine, stats),
    "dil_sepc_5x5": lambda C_in, C_out, stride, affine, stats: SepConv(C_in, C_out, 5, stride, 4, 2, affine, stats),
    "skip_connect": lambda C_in, C_out, stride, affine, stats: nn.Identity() if stride == 1 and C_in == C_out
    else FactorizedReduce(C_in, C_out, stride, affine, stats),
}


class MixedOp(nn.Module):
    def __init__(self, space, C, stride, affine, track_running_stats):
        super().__init__()
        self._ops = nn.ModuleList(OPS[name](C, C, stride, affine, track_running_stats) for name in space)

    def forward_gdas(self, x, weights, index: int):
        """The sampled operation alone, times its (straight-through) weight."""
        return self._ops[index](x) * weights[index]

    def forward_darts(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class NASNetSearchCell(nn.Module):
    """Two preprocessed inputs and ``steps`` nodes; edge "i<-j" feeds node i + 2 from node j."""

    def __init__(self, space, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, affine,
                 track_running_stats):
        super().__init__()
        self.reduction = reduction
        self.op_names = list(space)
        self.preprocess0 = OPS["skip_connect" if reduction_prev else "nor_conv_1x1"](
            C_prev_prev, C, 2 if reduction_prev else 1, affine, track_running_stats)
        self.preprocess1 = OPS["nor_conv_1x1"](C_prev, C, 1, affine, track_running_stats)
        self._steps, self._multiplier = steps, multiplier
        self._ops = nn.ModuleList()  # empty, as in that code (it keeps the key space identical)
        self.edges = nn.ModuleDict()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges[f"{i}<-{j}"] = MixedOp(space, C, stride, affine, track_running_stats)
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    @property
    def multiplier(self):
        return self._multiplier

    def _nodes(self, s0, s1, edge):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            states.append(sum(edge(f"{i}<-{j}", h) for j, h in enumerate(states)))
        return torch.cat(states[-self._multiplier:], dim=1)

    def forward_gdas(self, s0, s1, weightss, indexs):
        """``indexs``: the sampled operation of every edge, a tensor or a list of ints (read once here)."""
        indexs = indexs.flatten().tolist() if isinstance(indexs, torch.Tensor) else list(indexs)
        return self._nodes(s0, s1, lambda key, h: self.edges[key].forward_gdas(
            h, weightss[self.edge2index[key]], indexs[self.edge2index[key]]))

    def forward_darts(self, s0, s1, weightss):
        return self._nodes(s0, s1, lambda key, h: self.edges[key].forward_darts(h, weightss[self.edge2index[key]]))


def gumbel_hard(logits: torch.Tensor, tau: float):
    """accel.nn.darts' hard gumbel-softmax weights and sampled indices, drawn again while a draw is not finite
    (an exponential of exactly 0 gives an infinite gumbel), as GDAS' code draws them."""
    while True:
        weights, index = edge_weights(logits, "gumbel_hard", tau)
        if bool(torch.isfinite(weights).all()):
            return weights, index


class NASNetworkGDAS(nn.Module):
    """N normal cells per stage, a reduction cell between stages (3 stages of C, 2C and 4C channels)."""

    def __init__(self, C, N, steps, multiplier, stem_multiplier, num_classes, search_space, affine,
                 track_running_stats):
        super().__init__()
        unknown = [name for name in search_space if name not in OPS]
        if unknown:
            raise ValueError(f"NASNetworkGDAS: `search_space` names unknown operations {unknown}; known: {list(OPS)}")
        self._C, self._layerN, self._steps, self._multiplier = C, N, steps, multiplier
        self.stem = nn.Sequential(nn.Conv2d(3, C * stem_multiplier, kernel_size=3, padding=1, bias=False),
                                  nn.BatchNorm2d(C * stem_multiplier))
        channels = [C] * N + [2 * C] * N + [4 * C] * N
        reductions = ([False] * N + [True] + [False] * (N - 1) + [True] + [False] * (N - 1))
        C_prev_prev = C_prev = C * stem_multiplier
        reduction_prev = False
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(channels, reductions):
            self.cells.append(NASNetSearchCell(search_space, steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                               reduction_prev, affine, track_running_stats))
            C_prev_prev, C_prev, reduction_prev = C_prev, multiplier * C_curr, reduction
        self.op_names = list(search_space)
        self._Layer = len(self.cells)
        self.edge2index = self.cells[0].edge2index
        num_edge = self.cells[0].num_edges
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch_normal_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))
        self.arch_reduce_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))
        self.tau = 10

    def get_weights(self):
        """Every parameter but the architecture's, in module order: what the weight optimiser steps."""
        return [*self.stem.parameters(), *self.cells.parameters(), *self.lastact.parameters(),
                *self.global_pooling.parameters(), *self.classifier.parameters()]

    def set_tau(self, tau):
        self.tau = tau

    def get_tau(self):
        return self.tau

    def get_alphas(self):
        return [self.arch_normal_parameters, self.arch_reduce_parameters]

    def show_alphas(self):
        with torch.no_grad():
            normal = F.softmax(self.arch_normal_parameters, dim=-1).cpu()
            reduce = F.softmax(self.arch_reduce_parameters, dim=-1).cpu()
        return f"arch-normal-parameters :\n{normal}\narch-reduce-parameters :\n{reduce}"

    def get_message(self):
        lines = [self.extra_repr()] + [f" {i:02d}/{len(self.cells):02d} :: {cell.extra_repr()}"
                                       for i, cell in enumerate(self.cells)]
        return "\n".join(lines)

    def extra_repr(self):
        return (f"{type(self).__name__}(C={self._C}, N={self._layerN}, steps={self._steps}, "
                f"multiplier={self._multiplier}, L={self._Layer})")

    def genotype(self):
        """Per node, the two strongest (operation, input, weight) over all incoming edges and operations other
        than 'none' (weights as numpy floats, as that code returns them), and the concatenated nodes."""
        def parse(weights):
            gene = []
            for i in range(self._steps):
                edges = [(name, j, weights[self.edge2index[f"{i}<-{j}"]][k]) for j in range(2 + i)
                         for k, name in enumerate(self.op_names) if name != "none"]
                gene.append(tuple(sorted(edges, key=lambda e: -e[-1])[:2]))
            return gene

        with torch.no_grad():
            normal = parse(torch.softmax(self.arch_normal_parameters, dim=-1).cpu().numpy())
            reduce = parse(torch.softmax(self.arch_reduce_parameters, dim=-1).cpu().numpy())
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return {"normal": normal, "normal_concat": concat, "reduce": reduce, "reduce_concat": concat}

    def forward(self, inputs):
        normal = gumbel_hard(self.arch_normal_parameters, self.tau)
        reduce = gumbel_hard(self.arch_reduce_parameters, self.tau)
        normal = (normal[0], normal[1].tolist())  # one read of the sampled indices per forward
        reduce = (reduce[0], reduce[1].tolist())
        s0 = s1 = self.stem(inputs)
        for cell in self.cells:
            s0, s1 = s1, cell.forward_gdas(s0, s1, *(reduce if cell.reduction else normal))
        out = self.global_pooling(self.lastact(s1)).flatten(1)
        return out, self.classifier(out)
