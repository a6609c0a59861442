"""accel.nn.MixedOp: DARTS' MixedOp(C, stride) on accel's fused kernels.

It builds exactly the candidate operations of accel.reference.darts.MixedOp (same parameters, buffers and
state_dict keys), so it loads a DARTS MixedOp's checkpoint and swaps into a DARTS search network. What runs
differs:
- the depthwise convolutions of the sep_conv and dil_conv branches run on accel.ops.depthwise_conv2d,
  whose backward is many times faster than PyTorch's on the CPU;
- at stride 1 the max- and avg-pool branches with their BatchNorms run as one accel.ops.darts_pool_branches
  (float32), which keeps only x for backward;
- the sep_conv and dil_conv branches all start with ReLU(x): it is computed once and shared, so autograd
  keeps one copy of it instead of four;
- 'none' is never run, and the remaining outputs are mixed by accel.ops.mixed_op.
"""
import torch
from torch import nn

from accel.nn.depthwise_conv2d import use_depthwise_kernels
from accel.ops import darts_pool_branches, mixed_op
from accel.reference.darts import PRIMITIVES, DilConv, SepConv, search_ops


class MixedOp(nn.Module):
    """A DARTS search edge: ``forward(x, weights) = sum_o w_o * o(x)`` over the candidates in ``primitives``.

    The 'none' candidate is never run: its output is zero, so it adds nothing to the sum and its weight's
    gradient <grad, 0> is 0 -- which is what its weight gets here too (it is left out of the fused sum).
    Deciding this from the primitive's name, not the weight's value, needs no host sync.

    The conv branches run layer by layer after the shared ReLU, and the pooling branches as one op, so hooks
    on those branch modules themselves do not fire (hooks on their layers do).
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
        # The conv branches' layers after their leading ReLU, in a plain list: registering them again would
        # change the state_dict keys.
        self._after_relu = {k: list(op.op)[1:] for k, op in enumerate(self._ops) if isinstance(op, (SepConv, DilConv))}
        # Both pooling branches at stride 1 can run fused; the other branches are then mixed without them.
        pools = [primitives.index(name) if name in primitives else None for name in ("max_pool_3x3", "avg_pool_3x3")]
        self._pools = pools if stride == 1 and None not in pools else None
        if self._pools:
            others = [k for k in computed if k not in pools]
            self._others, self._other_weight_runs = others, _runs(others)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if weights.shape != (self._num_weights,):
            raise ValueError(f"MixedOp: `weights` must have shape ({self._num_weights},), one per primitive, "
                             f"got {tuple(weights.shape)}")
        if self._pools and x.dtype == torch.float32 and x.dim() == 4:
            return self._forward_with_fused_pools(x, weights)
        return self._mix(self._branches(x, self._computed), weights, self._weight_runs)

    def _branches(self, x, indices):
        """The outputs of the branches at ``indices``, the conv branches sharing one ReLU(x)."""
        relu_x = torch.relu(x) if any(k in self._after_relu for k in indices) else None
        ys = []
        for k in indices:
            if k in self._after_relu:
                y = relu_x
                for layer in self._after_relu[k]:
                    y = layer(y)
                ys.append(y)
            else:
                ys.append(self._ops[k](x))
        return ys

    def _forward_with_fused_pools(self, x, weights):
        max_k, avg_k = self._pools
        pool_weights = torch.stack([weights[max_k], weights[avg_k]])
        pools = darts_pool_branches(x, pool_weights, self._ops[max_k][1], self._ops[avg_k][1])
        if not self._others:
            return pools
        return self._mix(self._branches(x, self._others), weights, self._other_weight_runs) + pools

    @staticmethod
    def _mix(ys, weights, runs):
        return mixed_op(ys, weights=_gather(weights, runs))


def _gather(weights: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """weights at the indices given as runs, by slicing (no index tensor, no host sync)."""
    parts = [weights[start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open (start, stop) runs: [1, 2, 3, 5] -> [(1, 4), (5, 6)]."""
    runs = []
    for k in indices:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs
