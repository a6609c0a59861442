"""Triton kernel for the forward of accel::hopfield_update on CUDA tensors.

One program takes BLOCK_L state patterns of one (batch, head) and runs every update step and the final
retrieval in registers, FlashAttention's online softmax over blocks of BLOCK_S stored patterns: per step, a
running row maximum and sum rescale the accumulator of P k (P v for the retrieval), so no L x S logits are
ever written. The state pattern of every step is stored for the backward (accel/ops/hopfield_update.py, which
recomputes the associations from them).

Covered: float32, any steps, an additive mask broadcasting to (B, H, L, S), stored patterns shared by the batch.
The stopping rule, the association and the log-sum-exps on request, and float64, go through the PyTorch
kernel. S, the
widths and the step count are compile-time constants: loops with run-time bounds fail in Triton 3.6's
interpreter.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _retrieve(q, keys_ptr, rows_ptr, m_ptr, beta, offs_l, in_l, m_stride_l, m_stride_s, WIDTH: tl.constexpr,
              S: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """softmax(beta q K^T + mask) X for the program's rows, with K the S x D keys at keys_ptr and X the S x WIDTH
    rows at rows_ptr (the keys again for an update, the values for the retrieval): (BLOCK_L, BLOCK_W) float32.
    The products run in IEEE float32 (Triton's default for float32 is TF32: errors near 1e-3)."""
    row_max = tl.full([BLOCK_L], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_L], tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_W], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        keys = tl.load(keys_ptr + offs_s[:, None] * D + offs_d[None, :],
                       mask=in_s[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        logits = beta * tl.dot(q, tl.trans(keys), input_precision="ieee")
        if HAS_MASK:
            logits += tl.load(m_ptr + offs_l[:, None] * m_stride_l + offs_s[None, :] * m_stride_s,
                              mask=in_l[:, None] & in_s[None, :], other=0.0)
        logits = tl.where(in_s[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing unmasked yet: no NaN
        scale = tl.exp(row_max - safe_max)
        p = tl.exp(logits - safe_max[:, None])
        row_sum = row_sum * scale + tl.sum(p, axis=1)
        x = tl.load(rows_ptr + offs_s[:, None] * WIDTH + offs_w[None, :],
                    mask=in_s[:, None] & (offs_w[None, :] < WIDTH), other=0.0).to(tl.float32)
        acc = acc * scale[:, None] + tl.dot(p, x, input_precision="ieee")
        row_max = new_max
    return acc / row_sum[:, None]


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, m_ptr, beta_ptr, out_ptr, saved_ptr, H, L, K_BATCHED,
                    m_stride_b, m_stride_h, m_stride_l, m_stride_s, S: tl.constexpr, D: tl.constexpr,
                    DV: tl.constexpr, STEPS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_l, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = in_l[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr).to(tl.float32)
    head = (b * K_BATCHED * H + h) * S  # first stored pattern of this head (batch 0 when they are shared)
    keys = k_ptr + head * D
    m_base = m_ptr + b * m_stride_b + h * m_stride_h
    for t in range(STEPS):
        tl.store(saved_ptr + ((t * BH + bh) * L + offs_l[:, None]) * D + offs_d[None, :], q, mask=row_mask)
        q = _retrieve(q, keys, keys, m_base, beta, offs_l, in_l, m_stride_l, m_stride_s, D, S, D, HAS_MASK,
                      BLOCK_L, BLOCK_S, BLOCK_D, BLOCK_D)
    tl.store(saved_ptr + ((STEPS * BH + bh) * L + offs_l[:, None]) * D + offs_d[None, :], q, mask=row_mask)
    out = _retrieve(q, keys, v_ptr + head * DV, m_base, beta, offs_l, in_l, m_stride_l, m_stride_s, DV, S, D,
                    HAS_MASK, BLOCK_L, BLOCK_S, BLOCK_D, BLOCK_DV)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + (bh * L + offs_l[:, None]) * DV + offs_dv[None, :], out,
             mask=in_l[:, None] & (offs_dv[None, :] < DV))


def supports(q, eps, return_association, return_lse) -> bool:
    """Whether the Triton forward covers a call (else the PyTorch kernel runs): float32, no stopping rule, no
    association or log-sum-exps asked for."""
    return q.dtype == torch.float32 and eps is None and not return_association and not return_lse


def forward(q, k, v, beta, steps, mask):
    """(out, saved_q) of accel::hopfield_update's forward, as the PyTorch kernel returns them."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=q.device)
    saved_q = torch.empty(steps + 1, B, H, L, D, dtype=q.dtype, device=q.device)
    if mask is not None:
        mask = mask.to(torch.float32).expand(B, H, L, S)  # a view: broadcast dimensions get stride 0
        strides = mask.stride()
    else:
        mask, strides = q, (0, 0, 0, 0)
    BLOCK_D, BLOCK_DV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    BLOCK_L = 64 if L >= 64 else max(16, triton.next_power_of_2(L))
    grid = (triton.cdiv(L, BLOCK_L), B * H)
    _forward_kernel[grid](q, k, v, mask, beta.reshape(1), out, saved_q, H, L, int(k.shape[0] == B and B > 1),
                          *strides, S=S, D=D, DV=DV, STEPS=steps, HAS_MASK=mask is not q, BLOCK_L=BLOCK_L,
                          BLOCK_S=64, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=4)
    return out, saved_q
