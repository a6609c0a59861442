"""Benchmark cases for a whole DARTS search edge, `accel.nn.MixedOp`: the 8 candidate operations and
their mixture, forward and forward+backward (parameter and architecture gradients included).

This is where issue-level targets for the DARTS hot path are measured: the fused weighted sum alone is a
small part of an edge's cost, which the convolutions and the parameter-free branches dominate. The shapes
are DARTS' search shapes: batch 64, C=16 at 32x32 (normal cells) and C=64 at 8x8 (after the second
reduction). The eager baseline is DARTS' own MixedOp (`accel.reference.darts.MixedOp`) on the very same
parameter and buffer tensors, so every implementation trains the same weights.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from accel.benchmark.harness import Case
from accel.nn import MixedOp
from accel.reference import darts as reference

OP = "darts_edge"
BATCH = 64


def _setup(C: int, hw: int, stride: int):
    def setup(device: torch.device):
        torch.manual_seed(0)
        fast = MixedOp(C, stride).to(device).train()
        eager = sharing_tensors(reference.MixedOp(C, stride).train(), fast)
        x = torch.randn(BATCH, C, hw, hw, device=device, requires_grad=True)
        weights = torch.softmax(1e-3 * torch.randn(len(reference.PRIMITIVES), device=device), 0).requires_grad_()
        params = list(fast.parameters())
        return x, weights, params, fast, eager

    return setup


def sharing_tensors(module, source):
    """``module`` made to hold ``source``'s very Parameter and buffer tensors (the two have the same module
    tree), so both implementations train one set of weights and BN statistics while each keeps its own
    operations (nn.Conv2d in DARTS' edge, the fused kernels in accel's)."""
    for mine, theirs in zip(module.modules(), source.modules(), strict=True):
        mine._parameters.update(theirs._parameters)
        mine._buffers.update(theirs._buffers)
    return module


def _fast(x, weights, params, fast, eager):
    return fast(x, weights)


def _eager(x, weights, params, fast, eager):
    return eager(x, weights)


def conv_flops(run_one_sample) -> dict[str, float]:
    """FLOPs of a DARTS module's forward counted by torch's FlopCounterMode (its convolutions) on one sample
    (``run_one_sample()``), scaled by the batch, and three times that for forward+backward (each
    convolution's backward is two of its size: grad input, grad weight). The counter's own backward count is
    not used: it does not divide grouped convolutions by their groups."""
    with FlopCounterMode(display=False) as counter:
        run_one_sample()
    forward = BATCH * counter.get_total_flops()
    return {"fwd": forward, "fwd+bwd": 3 * forward}


def _flops(C: int, hw: int, stride: int) -> dict[str, float]:
    x, weights, params, fast, eager = _setup(C, hw, stride)(torch.device("cpu"))
    return conv_flops(lambda: eager(x[:1], weights))


def _case(name: str, C: int, hw: int, stride: int) -> Case:
    return Case(
        name=name,
        op=OP,
        shape=f"{BATCH}x{C}x{hw}x{hw} stride {stride}",
        setup=_setup(C, hw, stride),
        fast=_fast,
        reference=_eager,
        bytes_moved={"fwd": 0, "fwd+bwd": 0},  # compute-bound: the roofline is the FLOP bound
        flops=_flops(C, hw, stride),
        size=BATCH * C * hw * hw * 4,
        params={"C": C, "hw": hw, "stride": stride, "batch": BATCH, "primitives": list(reference.PRIMITIVES)},
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """DARTS' edge sizes: C=16 at 32x32 (a normal edge, and a reducing one), C=32 at 16x16 and C=64 at 8x8
    (after the first and second reduction); none in --quick (compiling an edge takes tens of seconds)."""
    if quick:
        return []
    return [_case("normal_32x32", 16, 32, 1), _case("reduce_32x32", 16, 32, 2), _case("mid_16x16", 32, 16, 1),
            _case("deep_8x8", 64, 8, 1)]
