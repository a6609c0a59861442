"""Triton kernels for accel::mixed_op and accel::mixed_op_backward on CUDA tensors.

The DARTS mixed op ``out = sum_k w_k * ys[k]``, with ``w = softmax(weights / tau)`` or the weights as
given, with the semantics of the C++ CPU kernel (csrc/cpu/mixed_op.cpp):

* One pass over memory each way. The forward kernel reads every active y_k once and writes ``out``
  once. The backward kernel reads ``grad`` and every active y_k once, writes ``dy_k = w_k * grad``
  once, and in the same pass sums ``<grad, y_k>`` over its block into a (programs, K) float64 buffer.
  torch's sum adds those partials in a fixed order and a one-program kernel applies the softmax
  Jacobian, so the weight gradient is bitwise reproducible (no atomics).
* A weight that is exactly 0 switches its branch off: the load of its y_k is masked off entirely (no
  memory traffic), its dy_k is zeros and its weight gradient 0. The mixing weights are computed inside
  the kernels in float64 (the softmax too: K is small), so nothing is read back to the host.
* Elementwise work accumulates in float32 (float64 for float64 inputs); the dot products are summed
  per block in that dtype and across blocks in float64.
* K is a compile-time constant (one compilation per branch count, a handful in a network), and no
  loop has a run-time bound: with NumPy 2.4, Triton 3.6's interpreter fails on ``range(scalar
  argument)`` (it calls int() on a 1-element array).

Passing K tensors: a Triton kernel cannot take a list, so the kernels get ys[0] as a base pointer and
an int64 tensor of offsets (kernels/tensor_lists.py). No y is copied, except one not in the kernel
layout (below).

Layout: all operands are walked as flat arrays in the layout ``torch.empty_like(ys[0])`` gets (ys[0]'s
own when it is dense, NCHW and channels-last alike), the rule of accel.ops.mixed_op.kernel_strides and
of the C++ kernel; an operand in another layout (an expanded gradient, a strided slice) is copied into
it first, and only that operand.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from accel.kernels.tensor_lists import addresses, in_layout

# Elements per program: 2048 elements over 8 warps is 8 per thread, two 128-bit loads per branch for
# float32, enough bytes in flight per SM to saturate H100 bandwidth; 1M elements make 512 programs.
BLOCK = 2048
NUM_WARPS = 8

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@triton.jit
def _softmax_shift_and_norm(weights_ptr, weights_stride, K, tau, BLOCK_K: tl.constexpr):
    """shift = max_j alpha_j / tau and norm = sum_j exp(alpha_j / tau - shift), in float64, so that
    softmax(alpha / tau)_k = exp(alpha_k / tau - shift) / norm, the C++ kernel's formula."""
    ks = tl.arange(0, BLOCK_K)
    logits = tl.load(weights_ptr + ks * weights_stride, mask=ks < K, other=float("-inf")).to(tl.float64) / tau
    shift = tl.max(logits, axis=0)
    norm = tl.sum(tl.exp(logits - shift), axis=0)
    return shift, norm


@triton.jit
def _mixing_weight(weights_ptr, weights_stride, k, tau, shift, norm, HAS_TAU: tl.constexpr):
    """w_k in float64: softmax(weights / tau)_k with a temperature, else weights[k] as given."""
    w = tl.load(weights_ptr + k * weights_stride).to(tl.float64)
    if HAS_TAU:
        w = tl.exp(w / tau - shift) / norm
    return w


@triton.jit
def _branch_mask(w, in_bounds):
    """in_bounds where the branch is on (w != 0), else all false.

    tl.where rather than ``in_bounds & (w != 0)``: Triton 3.9's interpreter broadcasts a scalar float
    comparison as float data, which ``&`` rejects; on the GPU both are one select.
    """
    return tl.where(w != 0, in_bounds, False)


@triton.jit
def _mixed_op_forward_kernel(
    y_base_ptr,  # ys[0]; branch k starts at y_base_ptr + branch_offsets[k] * VEC
    branch_offsets_ptr,  # int64 (K,), in units of VEC elements
    weights_ptr,
    weights_stride,
    out_ptr,
    numel,
    tau: tl.float64,  # annotated: a plain Python float would reach the kernel rounded to float32
    K: tl.constexpr,
    HAS_TAU: tl.constexpr,
    VEC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    if HAS_TAU:
        shift, norm = _softmax_shift_and_norm(weights_ptr, weights_stride, K, tau, BLOCK_K)
    else:
        shift, norm = 0.0, 1.0
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for k in range(K):
        w = _mixing_weight(weights_ptr, weights_stride, k, tau, shift, norm, HAS_TAU)
        y_ptrs = y_base_ptr + tl.load(branch_offsets_ptr + k) * VEC + offsets
        # A switched-off branch's load is masked off whole: no traffic, and inf/NaN in it never enter.
        y = tl.load(y_ptrs, mask=_branch_mask(w, in_bounds), other=0.0).to(ACC_DTYPE)
        acc += w.to(ACC_DTYPE) * y
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _mixed_op_backward_kernel(
    grad_ptr,
    y_base_ptr,  # as in the forward kernel
    branch_offsets_ptr,
    weights_ptr,
    weights_stride,
    dy_base_ptr,  # dy_k lives at dy_base_ptr + dy_offsets[k] * DY_VEC, like the ys
    dy_offsets_ptr,
    partial_dots_ptr,  # float64 (programs, K): <grad, y_k> over this program's block
    numel,
    tau: tl.float64,
    K: tl.constexpr,
    HAS_TAU: tl.constexpr,
    VEC: tl.constexpr,
    DY_VEC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    if HAS_TAU:
        shift, norm = _softmax_shift_and_norm(weights_ptr, weights_stride, K, tau, BLOCK_K)
    else:
        shift, norm = 0.0, 1.0
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(ACC_DTYPE)
    for k in range(K):
        w = _mixing_weight(weights_ptr, weights_stride, k, tau, shift, norm, HAS_TAU)
        active = w != 0
        y_ptrs = y_base_ptr + tl.load(branch_offsets_ptr + k) * VEC + offsets
        y = tl.load(y_ptrs, mask=_branch_mask(w, in_bounds), other=0.0).to(ACC_DTYPE)
        # tl.where, not w * g: a switched-off branch gets exact zeros even where grad is inf or NaN.
        dy = tl.where(active, w.to(ACC_DTYPE) * g, 0.0)
        dy_ptrs = dy_base_ptr + tl.load(dy_offsets_ptr + k) * DY_VEC + offsets
        tl.store(dy_ptrs, dy.to(dy_base_ptr.dtype.element_ty), mask=in_bounds)
        dot = tl.where(active, tl.sum(g * y, axis=0), 0.0)
        tl.store(partial_dots_ptr + pid * K + k, dot.to(tl.float64))


@triton.jit
def _weight_grad_kernel(
    dw_ptr,  # float64 (K,): <grad, y_k>
    weights_ptr,
    weights_stride,
    grad_weights_ptr,
    grad_weights_stride,
    tau: tl.float64,
    K: tl.constexpr,
    HAS_TAU: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: the weight gradient in the weights' dtype, dw itself without a temperature, else
    through the softmax: d alpha_j = (1/tau) p_j (dw_j - sum_i p_i dw_i)."""
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    dw = tl.load(dw_ptr + ks, mask=k_mask, other=0.0)
    if HAS_TAU:
        shift, norm = _softmax_shift_and_norm(weights_ptr, weights_stride, K, tau, BLOCK_K)
        alpha = tl.load(weights_ptr + ks * weights_stride, mask=k_mask, other=0.0).to(tl.float64)
        # Padding lanes get p = 0, so they add nothing to the sum below (exp there could be inf).
        p = tl.where(k_mask, tl.exp(alpha / tau - shift) / norm, 0.0)
        dw = p * (dw - tl.sum(p * dw, axis=0)) / tau
    tl.store(grad_weights_ptr + ks * grad_weights_stride, dw.to(grad_weights_ptr.dtype.element_ty), mask=k_mask)


# Under TRITON_INTERPRET=1 every tensor argument is copied to the host on its own, so an offset from
# ys[0] to another tensor only stays valid when the tensors already live in host memory.
_INTERPRETED = isinstance(_mixed_op_forward_kernel, InterpretedFunction)


def forward(ys: list[torch.Tensor], weights: torch.Tensor, tau: float | None) -> torch.Tensor:
    """out = sum_k w_k * ys[k] in the layout of torch.empty_like(ys[0])."""
    _check(ys, weights, tau)
    strides = _kernel_strides(ys[0])
    ys = [in_layout(y, strides) for y in ys]
    out = ys[0].new_empty_strided(ys[0].shape, strides)
    numel = out.numel()
    if numel == 0:
        return out
    y_base, branch_offsets, vec = addresses(ys, _INTERPRETED)
    _mixed_op_forward_kernel[(triton.cdiv(numel, BLOCK),)](
        y_base, branch_offsets, weights, weights.stride(0), out, numel, **_tau_args(tau), K=len(ys),
        VEC=vec, ACC_DTYPE=_acc_dtype(out.dtype), BLOCK=BLOCK, BLOCK_K=_block_k(len(ys)),
        num_warps=NUM_WARPS,
    )
    return out


def backward(grad: torch.Tensor, ys: list[torch.Tensor], weights: torch.Tensor,
             tau: float | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(grad_ys, grad_weights): grad_ys[k] = w_k * grad, K separate tensors in the kernel layout (so that
    no output aliases another); grad_weights in the weights' shape and dtype."""
    _check(ys, weights, tau)
    if grad.shape != ys[0].shape or grad.dtype != ys[0].dtype or grad.device != ys[0].device:
        raise ValueError(
            f"mixed_op_backward: `grad` must match ys[0] (shape {tuple(ys[0].shape)}, {ys[0].dtype}, "
            f"{ys[0].device}), got shape {tuple(grad.shape)}, {grad.dtype}, {grad.device}"
        )
    K = len(ys)
    strides = _kernel_strides(ys[0])
    ys = [in_layout(y, strides) for y in ys]
    grad = in_layout(grad, strides)
    numel = grad.numel()
    grad_ys = [grad.new_empty_strided(grad.shape, strides) for _ in range(K)]
    num_programs = triton.cdiv(numel, BLOCK)
    partial_dots = torch.empty((num_programs, K), dtype=torch.float64, device=grad.device)
    if numel > 0:
        y_base, branch_offsets, vec = addresses(ys, _INTERPRETED)
        dy_base, dy_offsets, dy_vec = addresses(grad_ys, _INTERPRETED)
        _mixed_op_backward_kernel[(num_programs,)](
            grad, y_base, branch_offsets, weights, weights.stride(0), dy_base, dy_offsets, partial_dots, numel,
            **_tau_args(tau), K=K, VEC=vec, DY_VEC=dy_vec, ACC_DTYPE=_acc_dtype(grad.dtype), BLOCK=BLOCK,
            BLOCK_K=_block_k(K), num_warps=NUM_WARPS,
        )
        if _INTERPRETED and dy_base.device.type != "cpu":
            raise NotImplementedError("interpreted Triton backward runs on CPU tensors only")
    return grad_ys, _weight_grad(partial_dots, weights, tau)


def _weight_grad(partial_dots: torch.Tensor, weights: torch.Tensor, tau: float | None) -> torch.Tensor:
    """The weight gradient from the (programs, K) float64 partial dot products <grad, y_k>."""
    # torch's reduction adds in a fixed order for a given shape: reproducible, and zeros when there are
    # no partials (empty tensors).
    dw = partial_dots.sum(0)
    # empty_like, as the op's fake kernel allocates it, so that real and fake strides agree.
    grad_weights = torch.empty_like(weights)
    K = weights.shape[0]
    _weight_grad_kernel[(1,)](
        dw, weights, weights.stride(0), grad_weights, grad_weights.stride(0), **_tau_args(tau), K=K,
        BLOCK_K=_block_k(K), num_warps=1,
    )
    return grad_weights


def _check(ys, weights, tau) -> None:
    """The C++ kernel's checks, for calls that reach torch.ops.accel.* without accel.ops.mixed_op."""
    if len(ys) == 0:
        raise ValueError("mixed_op: `ys` must hold at least one tensor")
    y0 = ys[0]
    if y0.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"mixed_op: `ys` must be float32, float64 or bfloat16, got {y0.dtype}")
    for k, y in enumerate(ys):
        if y.dtype != y0.dtype or y.shape != y0.shape or y.device != y0.device:
            raise ValueError(
                f"mixed_op: `ys[{k}]` ({tuple(y.shape)}, {y.dtype}, {y.device}) does not match `ys[0]` "
                f"({tuple(y0.shape)}, {y0.dtype}, {y0.device})"
            )
    if weights.dim() != 1 or weights.shape[0] != len(ys) or not weights.is_floating_point():
        raise ValueError(
            f"mixed_op: `weights` must be floating point of shape (K,) = ({len(ys)},), "
            f"got {weights.dtype} of shape {tuple(weights.shape)}"
        )
    if weights.device != y0.device:
        raise ValueError(f"mixed_op: `weights` is on {weights.device} but `ys` are on {y0.device}")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"mixed_op: `tau` must be finite and > 0, got {tau!r}")


def _kernel_strides(y0: torch.Tensor) -> tuple[int, ...]:
    # The rule of accel.ops.mixed_op.kernel_strides, restated here: kernels/ imports nothing from accel.ops.
    return torch.empty_like(y0, device="meta").stride()


def _tau_args(tau: float | None) -> dict:
    """The kernels' tau and HAS_TAU; without a temperature the weights are used as given."""
    return dict(tau=1.0, HAS_TAU=False) if tau is None else dict(tau=float(tau), HAS_TAU=True)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_k(K: int) -> int:
    return triton.next_power_of_2(K)
