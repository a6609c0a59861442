"""PC-DARTS' search network (Xu et al., 2020; yuhuixu1993/PC-DARTS model_search.py) under PC-DARTS' own names and
defaults: accel.nn.darts with partial channels K = 4 and edge normalisation, so that PC-DARTS' train_search.py
and Architect run with only the import changed (``from accel.nn.pc_darts import Network``).

As PC-DARTS': ``arch_parameters()`` is [alphas_normal, alphas_reduce, betas_normal, betas_reduce], drawn in
that order; ``Cell.forward(s0, s1, weights, weights2)`` takes the normalised edge weights as its fourth
argument; the state_dict keys are DARTS' (PC-DARTS' MixedOp holds the same modules on C / 4 channels).
accel.nn.darts' keyword options (weighting, tau, register_arch_parameters) are taken as well.
"""
from accel.nn import darts
from accel.nn.mixed_op import MixedOp as DartsMixedOp
from accel.reference.darts import PRIMITIVES

PARTIAL_CHANNELS = 4  # PC-DARTS' K for CIFAR-10


class MixedOp(DartsMixedOp):
    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, partial_channels: int = PARTIAL_CHANNELS):
        super().__init__(C, stride, primitives, partial_channels)


class Cell(darts.Cell):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, mixed_op=MixedOp, partial_channels: int = PARTIAL_CHANNELS):
        super().__init__(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, mixed_op,
                         partial_channels)

    def forward(self, s0, s1, weights, weights2=None, index=None):
        """PC-DARTS' order: ``weights2`` are the edges' normalised weights (accel.nn.darts' edge_scale)."""
        return super().forward(s0, s1, weights, index, weights2)


class Network(darts.Network):
    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, criterion=None, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, mixed_op=MixedOp, *,
                 partial_channels: int = PARTIAL_CHANNELS, edge_normalization: bool = True, **options):
        super().__init__(C, num_classes, layers, criterion, steps, multiplier, stem_multiplier, mixed_op,
                         partial_channels=partial_channels, edge_normalization=edge_normalization, **options)
