"""accel.nn.MixedOp: DARTS' MixedOp(C, stride) (and PC-DARTS' partial-channel one) on accel's fused kernels.

It builds exactly the candidate operations of accel.reference.darts.MixedOp (same parameters, buffers and
state_dict keys), so it loads a DARTS or PC-DARTS MixedOp's checkpoint and swaps into their search networks.
What runs differs:
- the sep_conv, dil_conv and (at stride 2) FactorizedReduce branches all start with ReLU(x): it is computed
  once and shared, so autograd keeps one copy of it instead of five;
- their depthwise convolutions run on accel.ops.depthwise_conv2d, whose backward is many times faster than
  PyTorch's on the CPU;
- their last BatchNorm and the weighted sum run as one accel.ops.batch_norm_mix, which keeps only the
  BatchNorms' inputs for backward (eager DARTS keeps their outputs too, one more tensor per branch);
- at stride 1 the max- and avg-pool branches with their BatchNorms run as one accel.ops.darts_pool_branches
  (float32), which keeps only x for backward;
- 'none' is never run, and what is left (identity, pools at stride 2) is mixed by accel.ops.mixed_op; those
  pools (and PC-DARTS' pooling of the bypassed channels) run on channels-last copies (accel.nn.pooling);
- with partial channels, the concatenation with the bypassed channels and PC-DARTS' channel shuffle are one
  write of the output.
"""
import torch
from torch import nn

from accel.nn.depthwise_conv2d import use_depthwise_kernels
from accel.nn.pooling import MaxPool2d, use_channels_last_pooling
from accel.ops import batch_norm_mix, darts_pool_branches, mixed_op
from accel.ops._checks import check_count
from accel.reference.darts import OPS, PRIMITIVES, DilConv, FactorizedReduce, SepConv, search_ops

_BATCH_NORM_MIX_DTYPES = (torch.float32, torch.float64)


class MixedOp(nn.Module):
    """A DARTS search edge: ``forward(x, weights) = sum_o w_o * o(x)`` over the candidates in ``primitives``.

    Args:
        C: channels of the edge's input and output.
        stride: 1 (normal cell) or 2 (the reduction cell's edges from its inputs).
        primitives: the candidate names, DARTS' 8 by default.
        partial_channels: PC-DARTS' K: only the first C/K channels go through the candidates, the others
            bypass them (max-pooled 2x2 at stride 2), and the output channels are shuffled in K groups as
            PC-DARTS' ``channel_shuffle`` does. 1 is DARTS.

    ``forward(x, weights, index=None)``: ``weights`` has one entry per primitive. With ``index`` (GDAS'
    hard sampling: ``weights`` are straight-through one-hot weights and ``index`` the sampled candidate),
    only that candidate runs and the output is GDAS' ``w_index * o_index(x) + sum_{k != index} w_k``, whose
    value is o_index(x) and which passes gradients to every weight. A tensor ``index`` is read with
    ``int()``: on a GPU that is a host sync, which a Python int avoids.

    The 'none' candidate is never run: its output is zero, so it adds nothing to the sum and its weight's
    gradient <grad, 0> is 0 -- which is what its weight gets here too (it is left out of the fused sum).
    Deciding this from the primitive's name, not the weight's value, needs no host sync.

    The branches run layer by layer after the shared ReLU, and the pooling branches as one op, so hooks
    on the branch modules themselves do not fire (hooks on their layers do).
    """

    def __init__(self, C: int, stride: int, primitives=PRIMITIVES, partial_channels: int = 1):
        super().__init__()
        check_count("MixedOp", "C", C)
        if stride not in (1, 2):
            raise ValueError(f"MixedOp: `stride` must be 1 or 2, got {stride!r}")
        if not (isinstance(partial_channels, int) and partial_channels >= 1 and C % partial_channels == 0):
            raise ValueError(f"MixedOp: `partial_channels` must be a positive int dividing C={C}, got "
                             f"{partial_channels!r}")
        primitives = list(primitives)
        unknown = [name for name in primitives if name not in OPS]
        if unknown:
            raise ValueError(f"MixedOp: `primitives` holds an unknown DARTS primitive: {unknown}; known: {sorted(OPS)}")
        self._channels = C
        self._k = partial_channels
        if partial_channels > 1:
            self.mp = MaxPool2d(2, 2)  # PC-DARTS' pooling of the bypassed channels at stride 2
        self._ops = use_channels_last_pooling(use_depthwise_kernels(search_ops(C // partial_channels, stride,
                                                                               primitives)))
        self._num_weights = len(primitives)
        computed = [k for k, name in enumerate(primitives) if name != "none"]
        if not computed:
            raise ValueError("MixedOp: `primitives` must hold at least one operation other than 'none'")
        self._computed = computed
        # Branches that start with ReLU(x) and end with a BatchNorm (conv branches, FactorizedReduce).
        self._normed = [k for k in computed if isinstance(self._ops[k], (SepConv, DilConv, FactorizedReduce))]
        # Both pooling branches at stride 1 can run fused.
        pools = [primitives.index(name) if name in primitives else None for name in ("max_pool_3x3", "avg_pool_3x3")]
        self._pools = pools if stride == 1 and None not in pools else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"MixedOp: `x` must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self._channels:
            raise ValueError(f"MixedOp: `x` must have shape (N, {self._channels}, H, W), got {tuple(x.shape)}")
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"MixedOp: `weights` must be a Tensor, got {type(weights).__name__}")
        if weights.shape != (self._num_weights,):
            raise ValueError(f"MixedOp: `weights` must have shape ({self._num_weights},), one per primitive, "
                             f"got {tuple(weights.shape)}")
        if self._k == 1:
            return self._mixture(x, weights, index)
        part = x.shape[1] // self._k
        mixed = self._mixture(x[:, :part], weights, index)
        bypass = x[:, part:]
        if mixed.shape[2] != x.shape[2]:
            bypass = self.mp(bypass)
        return _concat_and_shuffle(mixed, bypass, self._k)

    def _mixture(self, x, weights, index):
        if index is not None:
            return self._sampled(x, weights, int(index))
        fuse_pools = self._pools is not None and x.dtype == torch.float32 and x.dim() == 4
        fuse_norms = x.dtype in _BATCH_NORM_MIX_DTYPES
        relu_x = torch.relu(x) if self._normed else None
        parts, plain, plain_k, normed, normed_k, norms = [], [], [], [], [], []
        for k in self._computed:
            if fuse_pools and k in self._pools:
                continue
            if k in self._normed and fuse_norms:
                z, norm = _before_last_norm(self._ops[k], relu_x)
                normed.append(z), normed_k.append(k), norms.append(norm)
            elif k in self._normed:
                z, norm = _before_last_norm(self._ops[k], relu_x)
                plain.append(norm(z)), plain_k.append(k)
            else:
                plain.append(self._ops[k](x)), plain_k.append(k)
        if normed:
            parts.append(batch_norm_mix(normed, _gather(weights, normed_k), norms))
        if plain:
            parts.append(mixed_op(plain, weights=_gather(weights, plain_k)))
        if fuse_pools:
            max_k, avg_k = self._pools
            pool_weights = torch.stack([weights[max_k], weights[avg_k]])
            parts.append(darts_pool_branches(x, pool_weights, self._ops[max_k][1], self._ops[avg_k][1]))
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def _sampled(self, x, weights, k):
        if not 0 <= k < self._num_weights:
            raise ValueError(f"MixedOp: `index` must be in [0, {self._num_weights}), got {k}")
        others = weights[:k].sum() + weights[k + 1:].sum()
        return weights[k] * self._ops[k](x) + others


def _before_last_norm(op: nn.Module, relu_x: torch.Tensor):
    """A branch that starts with ReLU and ends with a BatchNorm, run on relu_x up to that BatchNorm:
    returns its input and the BatchNorm module."""
    if isinstance(op, FactorizedReduce):
        return torch.cat([op.conv_1(relu_x), op.conv_2(relu_x[:, :, 1:, 1:])], dim=1), op.bn
    *layers, norm = list(op.op)[1:]
    z = relu_x
    for layer in layers:
        z = layer(z)
    return z, norm


def _concat_and_shuffle(mixed: torch.Tensor, bypass: torch.Tensor, k: int) -> torch.Tensor:
    """PC-DARTS' ``channel_shuffle(cat([mixed, bypass], 1), k)`` written in one pass: output channel
    j * k + g is channel j of group g, and group 0 is ``mixed``, groups 1.. are ``bypass`` in order."""
    N, part, H, W = mixed.shape
    groups = bypass.reshape(N, k - 1, part, H, W).transpose(1, 2)
    return torch.cat([mixed.unsqueeze(2), groups], dim=2).reshape(N, k * part, H, W)


def _gather(weights: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """weights at sorted ``indices``, by slicing runs of consecutive indices: an index tensor would have to be
    copied to the weights' device on every call (or live in a buffer DARTS' MixedOp lacks)."""
    runs = []
    for k in indices:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    parts = [weights[start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
