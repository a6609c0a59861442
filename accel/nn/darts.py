"""DARTS' search cell and network (Liu et al., 2019; quark0/darts cnn/model_search.py) on accel.nn.MixedOp.

The structure, module names and genotype rule are DARTS'. One deliberate difference: the architecture
parameters ``alphas_normal`` and ``alphas_reduce`` are real nn.Parameters of the network, so that
DataParallel/DDP replicate them and state_dict() saves them (DARTS keeps them as loose tensors).
``parameters()`` therefore includes them; give the weight optimiser ``weights_parameters()`` and the
architecture optimiser ``arch_parameters()``.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from accel.nn.mixed_op import MixedOp
from accel.reference.darts import PRIMITIVES, FactorizedReduce, ReLUConvBN

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

class Cell(nn.Module):
    """A search cell: two preprocessed inputs and ``steps`` intermediate nodes, each node the sum of the
    mixed ops on the edges from every earlier node. The output concatenates the last ``multiplier`` nodes."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, mixed_op=MixedOp):
        super().__init__()
        self.reduction = reduction
        # After a reduction cell, s0 is at twice s1's resolution and must be halved too.
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                # In a reduction cell only the edges leaving the two cell inputs reduce.
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(mixed_op(C, stride))

    def forward(self, s0, s1, weights):
        """``weights``: (number of edges, number of primitives), one row per edge in construction order."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """DARTS' search network: a conv stem, ``layers`` cells with reductions at layers//3 and 2*layers//3,
    global average pooling and a linear classifier. ``mixed_op`` is the edge class (accel.nn.MixedOp, or
    accel.reference.darts.MixedOp for DARTS' eager twin with the same parameters)."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, mixed_op=MixedOp):
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                   mixed_op))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        num_edges = sum(2 + i for i in range(steps))
        # DARTS' initialisation: small random logits, so the mixture starts near uniform.
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(num_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(num_edges, len(PRIMITIVES)))

    def forward(self, input):
        s0 = s1 = self.stem(input)
        weights_normal = F.softmax(self.alphas_normal, dim=-1)
        weights_reduce = F.softmax(self.alphas_reduce, dim=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weights_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the architecture's: what DARTS' weight optimiser steps."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> Genotype:
        """The discrete cell: per node, the 2 strongest incoming edges, each with its strongest operation
        other than 'none' (an edge's strength is its largest non-'none' weight), as DARTS' ``_parse``."""
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(
            normal=self._parse(F.softmax(self.alphas_normal.detach(), dim=-1).tolist()),
            normal_concat=concat,
            reduce=self._parse(F.softmax(self.alphas_reduce.detach(), dim=-1).tolist()),
            reduce_concat=concat,
        )

    def _parse(self, weights: list[list[float]]) -> list[tuple[str, int]]:
        none = PRIMITIVES.index("none")
        candidates = [k for k in range(len(PRIMITIVES)) if k != none]
        gene = []
        start = 0
        for i in range(self._steps):
            W = weights[start:start + 2 + i]
            # sorted() is stable and max() keeps the first maximum: ties go to the lower index, as in DARTS.
            edges = sorted(range(2 + i), key=lambda j: -max(W[j][k] for k in candidates))[:2]
            for j in edges:
                k_best = max(candidates, key=lambda k: W[j][k])
                gene.append((PRIMITIVES[k_best], j))
            start += 2 + i
        return gene
