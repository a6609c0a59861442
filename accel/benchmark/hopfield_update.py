"""Benchmark cases for `accel.ops.hopfield_update`: Hopfield update steps and the final retrieval.

The paper's retrieval setting, batched as the Hopfield layers run it: 1024 stored patterns of width 64 per
head, 256 state patterns, 4 heads, batch 8, one or three update steps before the retrieval. The eager
baseline is the reference loop (accel.reference.hopfield), which builds and keeps the L x S association of
every step for autograd, as the layers' code does; torch.compile of it is timed beside it.
"""
import torch

from accel.benchmark.harness import Case
from accel.ops import hopfield_update
from accel.reference import hopfield as reference

OP = "hopfield_update"
B, H, L, S, D = 8, 4, 256, 1024, 64
BETA = 0.125  # 1 / sqrt(d)


def _setup(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, rows, D, generator=gen) for rows in (L, S, S))
    return tuple(t.to(device).requires_grad_() for t in (q, k, v))


def _case(steps: int) -> Case:
    # multiply-adds: (steps + 1) logits products, steps updates, one retrieval; the backward about 2.5x
    forward = B * H * L * S * D * (2 * steps + 2)
    return Case(
        name=f"steps_{steps}",
        op=OP,
        shape=f"B={B} H={H} L={L} S={S} d={D} steps={steps}",
        setup=_setup,
        fast=lambda q, k, v: hopfield_update(q, k, v, BETA, steps),
        reference=lambda q, k, v: reference.hopfield_update(q, k, v, BETA, steps)[0],
        bytes_moved={"fwd": 0, "fwd+bwd": 0},  # matrix products: the roofline is the FLOP bound
        flops={"fwd": 2 * forward, "fwd+bwd": 7 * forward},
        size=steps,
        sweeps=("steps",),
        params={"B": B, "H": H, "L": L, "S": S, "d": D, "steps": steps},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """1 and 3 update steps; --quick: 1."""
    return [_case(1)] if quick else [_case(1), _case(3)]
