"""accel.nn.MixedOp: DARTS' MixedOp(C, stride) with its weighted sum done by the fused accel.ops.mixed_op.

It builds exactly the candidate operations of accel.reference.darts.MixedOp (same parameters, buffers
and state_dict keys), so it loads a DARTS MixedOp's checkpoint and swaps into a DARTS search network.
The depthwise convolutions of the sep_conv and dil_conv branches run on accel.ops.depthwise_conv2d,
whose backward is many times faster than PyTorch's on the CPU.
"""
import torch
from torch import nn

from accel.nn.depthwise_conv2d import use_depthwise_kernels
from accel.ops import mixed_op
from accel.reference.darts import PRIMITIVES, search_ops


class MixedOp(nn.Module):
    """A DARTS search edge: ``forward(x, weights) = sum_o w_o * o(x)`` over the candidates in ``primitives``.

    The 'none' candidate is never run: its output is zero, so it adds nothing to the sum and its weight's
    gradient <grad, 0> is 0 -- which is what its weight gets here too (it is left out of the fused sum).
    Deciding this from the primitive's name, not the weight's value, needs no host sync.
    """

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES):
        super().__init__()
        primitives = list(primitives)
        self._ops = use_depthwise_kernels(search_ops(C, stride, primitives))
        self._num_weights = len(primitives)
        computed = [k for k, name in enumerate(primitives) if name != "none"]
        if not computed:
            raise ValueError("MixedOp: `primitives` must hold at least one operation other than 'none'")
        self._computed = computed
        # The kept weights as runs of consecutive indices, taken by slicing: an index tensor would have to
        # be copied to the weights' device on every call (or live in a buffer DARTS' MixedOp lacks).
        self._weight_runs = _runs(computed)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if weights.shape != (self._num_weights,):
            raise ValueError(f"MixedOp: `weights` must have shape ({self._num_weights},), one per primitive, "
                             f"got {tuple(weights.shape)}")
        ys = [self._ops[k](x) for k in self._computed]
        kept = [weights[start:stop] for start, stop in self._weight_runs]
        return mixed_op(ys, weights=kept[0] if len(kept) == 1 else torch.cat(kept))


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open (start, stop) runs: [1, 2, 3, 5] -> [(1, 4), (5, 6)]."""
    runs = []
    for k in indices:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs
