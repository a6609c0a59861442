"""Benchmark cases for `accel.ops.hopfield_update`: Hopfield update steps and the final retrieval.

Two settings:
- retrieval, as the Hopfield layers run it: batch 8, 8 heads, L = S = 1024 state and stored patterns of
  width 64, three update steps before the retrieval (--quick: batch 2, one step);
- pooling, the immune-repertoire case (HopfieldPooling over a repertoire): one state pattern per head against
  S = 100k stored patterns of width 32, one update step.

The eager baseline is the reference loop (accel.reference.hopfield), which builds and keeps the L x S
association of every step for autograd, as the layers' code does; torch.compile of it is timed beside it, and
the peer `sdpa` runs the same steps as a loop of scaled_dot_product_attention (q <- sdpa(q, k, k), then
sdpa(q, k, v)), PyTorch's fused attention, whose backward also recomputes the association.
"""
import torch
import torch.nn.functional as F

from accel.benchmark.harness import Case
from accel.ops import hopfield_update
from accel.reference import hopfield as reference


def _sdpa_loop(q, k, v, beta, steps):
    for _ in range(steps):
        q = F.scaled_dot_product_attention(q, k, k, scale=beta)
    return F.scaled_dot_product_attention(q, k, v, scale=beta)


def _case(name: str, B: int, H: int, L: int, S: int, d: int, steps: int) -> Case:
    beta = d ** -0.5

    def setup(device: torch.device):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, rows, d, generator=gen) for rows in (L, S, S))
        return tuple(t.to(device).requires_grad_() for t in (q, k, v))

    # multiply-adds: (steps + 1) logits products, steps updates, one retrieval; the backward about 2.5x
    forward = B * H * L * S * d * (2 * steps + 2)
    return Case(
        name=name,
        op="hopfield_update",
        shape=f"B={B} H={H} L={L} S={S} d={d} steps={steps}",
        setup=setup,
        fast=lambda q, k, v: hopfield_update(q, k, v, beta, steps),
        reference=lambda q, k, v: reference.hopfield_update(q, k, v, beta, steps)[0],
        peers={"sdpa": lambda q, k, v: _sdpa_loop(q, k, v, beta, steps)},
        # the retrieval is matrix products (the FLOP bound); pooling streams k and v once per step
        bytes_moved={"fwd": 4 * B * H * S * d * (steps + 2), "fwd+bwd": 4 * B * H * S * d * (3 * steps + 5)},
        flops={"fwd": 2 * forward, "fwd+bwd": 7 * forward},
        size=B * H * L * S,
        sweeps=("association",),
        params={"B": B, "H": H, "L": L, "S": S, "d": d, "steps": steps},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """The retrieval and pooling settings; --quick: a smaller retrieval."""
    if quick:
        return [_case("retrieval_quick", 2, 8, 1024, 1024, 64, 1)]
    return [_case("retrieval", 8, 8, 1024, 1024, 64, 3), _case("pooling", 4, 8, 1, 100_000, 32, 1)]
