"""Benchmark cases for a whole DARTS search cell, `accel.nn.darts.Cell`: its two preprocessing layers and 14
mixed edges (4 nodes), forward and forward+backward (parameter and architecture gradients included).

The eager baseline is the same cell built on DARTS' own MixedOp (`accel.reference.darts.MixedOp`), holding
the very same parameter and buffer tensors. Shapes: batch 64, the first normal cell of the C=16 network
(inputs of 48 channels at 32x32).
"""
import torch

from accel.benchmark.darts_edge import BATCH, conv_flops, sharing_tensors
from accel.benchmark.harness import Case
from accel.nn.darts import Cell
from accel.reference import darts as reference

OP = "darts_cell"
STEPS = MULTIPLIER = 4


def _setup(C_prev: int, C: int, hw: int):
    def setup(device: torch.device):
        torch.manual_seed(0)
        fast = Cell(STEPS, MULTIPLIER, C_prev, C_prev, C, reduction=False, reduction_prev=False).to(device).train()
        eager = Cell(STEPS, MULTIPLIER, C_prev, C_prev, C, reduction=False, reduction_prev=False,
                     mixed_op=reference.MixedOp).to(device).train()
        eager = sharing_tensors(eager, fast)
        s0 = torch.randn(BATCH, C_prev, hw, hw, device=device, requires_grad=True)
        s1 = torch.randn(BATCH, C_prev, hw, hw, device=device, requires_grad=True)
        edges = sum(2 + i for i in range(STEPS))
        weights = torch.softmax(1e-3 * torch.randn(edges, len(reference.PRIMITIVES), device=device), -1)
        return s0, s1, weights.requires_grad_(), list(fast.parameters()), fast, eager

    return setup


def _fast(s0, s1, weights, params, fast, eager):
    return fast(s0, s1, weights)


def _eager(s0, s1, weights, params, fast, eager):
    return eager(s0, s1, weights)


def _flops(C_prev: int, C: int, hw: int) -> dict[str, float]:
    s0, s1, weights, params, fast, eager = _setup(C_prev, C, hw)(torch.device("cpu"))
    return conv_flops(lambda: eager(s0[:1], s1[:1], weights))


def _case(name: str, C_prev: int, C: int, hw: int) -> Case:
    return Case(
        name=name,
        op=OP,
        shape=f"{BATCH}x{C_prev}x{hw}x{hw} -> {BATCH}x{MULTIPLIER * C}x{hw}x{hw}",
        setup=_setup(C_prev, C, hw),
        fast=_fast,
        reference=_eager,
        bytes_moved={"fwd": 0, "fwd+bwd": 0},  # compute-bound: the roofline is the FLOP bound
        flops=_flops(C_prev, C, hw),
        size=BATCH * C_prev * hw * hw * 4,
        params={"C_prev": C_prev, "C": C, "hw": hw, "batch": BATCH, "steps": STEPS},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """The first normal cell of the search network; none in --quick (torch.compile of a cell takes about
    6 minutes on 2 cores)."""
    if quick:
        return []
    return [_case("normal_32x32", 48, 16, 32)]
