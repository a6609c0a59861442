"""Triton kernels for accel::rk_stage and accel::rk_stage_backward on CUDA tensors.

Forward, ``_forward_kernel``: one program per BLOCK_B rows x BLOCK_D columns computes
g = y0 + h[:, None] * sum_j a[j] k[j], the terms of an element added in registers in the reference's order
((a0 k0 + a1 k1) + a2 k2) + ..., over the nonzero coefficients only (a stage whose coefficient is 0 is never
read, as in the CPU kernel csrc/cpu/rk_stage.cpp).

Backward, ``_backward_kernel``: one program per BLOCK_B rows loops over the row's D columns in BLOCK_D pieces,
writes grad_k[j] = a[j] h grad for every stage j of k (exact zeros for a zero coefficient and beyond len(a)),
and accumulates grad_h = sum_d grad * sum_j a[j] k[j] in float64 (the stage sum of an element in the input's
dtype, like the reference and the CPU kernel).

The coefficients reach the kernels as small tensors in the input's dtype (a Python float argument would be
rounded to float32), built once per (row, dtype, device) and cached, so a call costs no host-to-device copy.
The number of nonzero coefficients M, the number of stages S and D are compile-time constants: loops with
run-time bounds fail in Triton 3.6's interpreter, and the solver calls these with a few fixed shapes.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 256
FORWARD_TILE = 2048  # elements per forward program
BACKWARD_ROWS = 1024  # BLOCK_B * BLOCK_D elements per backward step

_coefficients_cache: dict = {}


def _coefficients(a, s, dtype, device):
    """(nonzero coefficients, their stage indices (int64), every stage's coefficient (s,, zeros padded)), cached."""
    key = (tuple(float(x) for x in a), s, dtype, device)
    found = _coefficients_cache.get(key)
    if found is None:
        nonzero = [(j, float(aj)) for j, aj in enumerate(a) if aj != 0.0]
        full = [float(aj) for aj in a] + [0.0] * (s - len(a))
        found = (torch.tensor([c for _, c in nonzero] or [0.0], dtype=dtype, device=device),
                 torch.tensor([j for j, _ in nonzero] or [0], dtype=torch.int64, device=device),
                 torch.tensor(full or [0.0], dtype=dtype, device=device))
        if len(_coefficients_cache) > 256:
            _coefficients_cache.clear()
        _coefficients_cache[key] = found
    return found


@triton.jit
def _stage_sum(k_ptr, coef_ptr, idx_ptr, offs, mask, stage_stride, M: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """sum_j coef[j] k[idx[j]] at the offsets `offs` of a (B, D) stage, added in order (0 when M = 0)."""
    acc = tl.zeros([BLOCK_B, BLOCK_D], DTYPE)
    for j in tl.static_range(M):
        c = tl.load(coef_ptr + j)
        stage = tl.load(idx_ptr + j)
        term = c * tl.load(k_ptr + stage * stage_stride + offs, mask=mask, other=0.0)
        if j == 0:
            acc = term
        else:
            acc = acc + term
    return acc


@triton.jit
def _forward_kernel(y0_ptr, k_ptr, h_ptr, coef_ptr, idx_ptr, g_ptr, B, D: tl.constexpr, M: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < B
    mask = in_rows[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    y0 = tl.load(y0_ptr + offs, mask=mask, other=0.0)
    if M > 0:
        h = tl.load(h_ptr + rows, mask=in_rows, other=0.0)
        acc = _stage_sum(k_ptr, coef_ptr, idx_ptr, offs, mask, B * D, M, BLOCK_B, BLOCK_D, y0.dtype)
        g = y0 + h[:, None] * acc
    else:
        g = y0
    tl.store(g_ptr + offs, g, mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, k_ptr, h_ptr, coef_ptr, idx_ptr, full_ptr, grad_k_ptr, grad_h_ptr, B,
                     D: tl.constexpr, M: tl.constexpr, S: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    in_rows = rows < B
    h = tl.load(h_ptr + rows, mask=in_rows, other=0.0)
    dot = tl.zeros([BLOCK_B], tl.float64)
    stage_stride = B * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = in_rows[:, None] & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if M > 0:
            acc = _stage_sum(k_ptr, coef_ptr, idx_ptr, offs, mask, stage_stride, M, BLOCK_B, BLOCK_D, grad.dtype)
            dot += tl.sum(grad.to(tl.float64) * acc.to(tl.float64), axis=1)
        for j in tl.static_range(S):
            c = tl.load(full_ptr + j)
            gk = tl.where(c != 0.0, (c * h)[:, None] * grad, 0.0)
            tl.store(grad_k_ptr + j * stage_stride + offs, gk.to(grad.dtype), mask=mask)
    tl.store(grad_h_ptr + rows, dot.to(h.dtype), mask=in_rows)


def _block_d(D):
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def forward(y0, k, h, a):
    """accel::rk_stage: g (B, D) = y0 + h[:, None] * sum_j a[j] k[j]."""
    y0, k, h = y0.contiguous(), k.contiguous(), h.contiguous()
    B, D = y0.shape
    g = torch.empty_like(y0, memory_format=torch.contiguous_format)
    if B == 0 or D == 0:
        return g
    coef, idx, _ = _coefficients(a, k.shape[0], y0.dtype, y0.device)
    M = sum(1 for aj in a if aj != 0.0)
    BLOCK_D = _block_d(D)
    BLOCK_B = min(max(FORWARD_TILE // BLOCK_D, 1), triton.next_power_of_2(B))
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(D, BLOCK_D))
    _forward_kernel[grid](y0, k, h, coef, idx, g, B, D=D, M=M, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
    return g


def backward(grad, k, h, a):
    """accel::rk_stage_backward: (grad_k (s, B, D), grad_h (B,))."""
    grad, k, h = grad.contiguous(), k.contiguous(), h.contiguous()
    s = k.shape[0]
    B, D = grad.shape
    grad_k = torch.empty_like(k, memory_format=torch.contiguous_format)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    if B == 0:
        return grad_k, grad_h
    if D == 0 or s == 0:
        grad_k.zero_()
        grad_h.zero_()
        return grad_k, grad_h
    coef, idx, full = _coefficients(a, s, grad.dtype, grad.device)
    M = sum(1 for aj in a if aj != 0.0)
    BLOCK_D = _block_d(D)
    BLOCK_B = min(max(BACKWARD_ROWS // BLOCK_D, 1), triton.next_power_of_2(B))
    grid = (triton.cdiv(B, BLOCK_B),)
    _backward_kernel[grid](grad, k, h, coef, idx, full, grad_k, grad_h, B, D=D, M=M, S=s, BLOCK_B=BLOCK_B,
                           BLOCK_D=BLOCK_D)
    return grad_k, grad_h
