"""Triton kernels for the forward and the backward of accel::hopfield_update on CUDA tensors.

Forward: one program takes BLOCK_L state patterns of one (batch, head) and runs every update step and the final
retrieval in registers, FlashAttention's online softmax over blocks of BLOCK_S stored patterns: per step, a
running row maximum and sum rescale the accumulator of P k (P v for the retrieval), so no L x S logits are
ever written. The state pattern and the softmax's row statistics (maximum, 1/sum) of every step are stored for
the backward.

Backward (accel::hopfield_update_backward): the steps in reverse, FlashAttention-2's split, two launches per
step: a kernel over blocks of rows rebuilds P from the saved statistics and computes dq_t, a kernel over blocks
of stored patterns accumulates dk and dv over all rows. Every output element has one writer: deterministic, no
atomics. Rows the stopping rule had stopped pass their gradient through.

Forward covers: float32, any steps, an additive mask broadcasting to (B, H, L, S), stored patterns shared by the
batch; the stopping rule, the association on request, and float64 go through the PyTorch kernel. The backward
covers float32, stopped rows included. The loop bounds, S, the widths, the forward's step count and the
backward's L, are compile-time constants: loops with run-time bounds fail in Triton 3.6's interpreter.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _retrieve(q, keys_ptr, rows_ptr, m_ptr, beta, offs_l, in_l, m_stride_l, m_stride_s, WIDTH: tl.constexpr,
              S: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """softmax(beta q K^T + mask) X for the program's rows, with K the S x D keys at keys_ptr and X the S x WIDTH
    rows at rows_ptr (the keys again for an update, the values for the retrieval): (BLOCK_L, BLOCK_W) float32,
    and the rows' maxima and 1/sums (BLOCK_L,) The products run in IEEE float32 (Triton's default for float32 is
    TF32: errors near 1e-3)."""
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
    inv_sum = 1.0 / row_sum
    return acc * inv_sum[:, None], row_max, inv_sum


@triton.jit
def _store_stats(ptrs, top, inv_sum, in_l):
    tl.store(ptrs, top, mask=in_l)
    tl.store(ptrs + 1, inv_sum, mask=in_l)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, m_ptr, beta_ptr, out_ptr, saved_ptr, stats_ptr, H, L, K_BATCHED,
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
        q, top, inv_sum = _retrieve(q, keys, keys, m_base, beta, offs_l, in_l, m_stride_l, m_stride_s, D, S, D,
                                    HAS_MASK, BLOCK_L, BLOCK_S, BLOCK_D, BLOCK_D)
        _store_stats(stats_ptr + ((t * BH + bh) * L + offs_l) * 2, top, inv_sum, in_l)
    tl.store(saved_ptr + ((STEPS * BH + bh) * L + offs_l[:, None]) * D + offs_d[None, :], q, mask=row_mask)
    out, top, inv_sum = _retrieve(q, keys, v_ptr + head * DV, m_base, beta, offs_l, in_l, m_stride_l, m_stride_s,
                                  DV, S, D, HAS_MASK, BLOCK_L, BLOCK_S, BLOCK_D, BLOCK_DV)
    _store_stats(stats_ptr + ((STEPS * BH + bh) * L + offs_l) * 2, top, inv_sum, in_l)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + (bh * L + offs_l[:, None]) * DV + offs_dv[None, :], out,
             mask=in_l[:, None] & (offs_dv[None, :] < DV))


def _launch_layout(q, mask, S, DV):
    """What both passes launch with: the mask as a (B, H, L, S) float32 view (broadcast dimensions get stride 0;
    q stands in when there is none) and its strides, and the row and width block sizes."""
    B, H, L, D = q.shape
    if mask is not None:
        mask = mask.to(torch.float32).expand(B, H, L, S)
        strides = mask.stride()
    else:
        mask, strides = q, (0, 0, 0, 0)
    BLOCK_L = 64 if L >= 64 else max(16, triton.next_power_of_2(L))
    return mask, strides, BLOCK_L, max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))


def supports(q, eps, return_association) -> bool:
    """Whether the Triton forward covers a call (else the PyTorch kernel runs): float32, no stopping rule, no
    association asked for."""
    return q.dtype == torch.float32 and eps is None and not return_association


def forward(q, k, v, beta, steps, mask):
    """(out, saved_q, stats) of accel::hopfield_update's forward, as the PyTorch kernel returns them."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=q.device)
    saved_q = torch.empty(steps + 1, B, H, L, D, dtype=q.dtype, device=q.device)
    stats = torch.empty(steps + 1, B, H, L, 2, dtype=q.dtype, device=q.device)
    mask, strides, BLOCK_L, BLOCK_D, BLOCK_DV = _launch_layout(q, mask, S, DV)
    grid = (triton.cdiv(L, BLOCK_L), B * H)
    _forward_kernel[grid](q, k, v, mask, beta.reshape(1), out, saved_q, stats, H, L, int(k.shape[0] == B and B > 1),
                          *strides, S=S, D=D, DV=DV, STEPS=steps, HAS_MASK=mask is not q, BLOCK_L=BLOCK_L,
                          BLOCK_S=64, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=4)
    return out, saved_q, stats


@triton.jit
def _association(bq, keys, top, inv_sum, m_base, m_stride_l, m_stride_s, offs_l, in_l, offs_s, in_s,
                 HAS_MASK: tl.constexpr):
    """P = exp(beta q K^T + mask - max) / sum for a block of rows and stored patterns, rebuilt from the forward's
    row statistics (bq is beta q); 0 outside S."""
    logits = tl.dot(bq, tl.trans(keys), input_precision="ieee")
    if HAS_MASK:
        logits += tl.load(m_base + offs_l[:, None] * m_stride_l + offs_s[None, :] * m_stride_s,
                          mask=in_l[:, None] & in_s[None, :], other=0.0)
    p = tl.exp(logits - top[:, None]) * inv_sum[:, None]
    return tl.where(in_s[None, :], p, 0.0)


@triton.jit
def _load_rows(ptr, offs_l, in_l, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_w = tl.arange(0, BLOCK_W)
    return tl.load(ptr + offs_l[:, None] * WIDTH + offs_w[None, :], mask=in_l[:, None] & (offs_w[None, :] < WIDTH),
                   other=0.0)


@triton.jit
def _tiles(k_ptr, x_ptr, head, offs_s, in_s, D: tl.constexpr, WIDTH: tl.constexpr, RETRIEVAL: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """The keys K and the rows X (V for the retrieval, K again for an update) of stored patterns offs_s."""
    keys = _load_rows(k_ptr + head * D, offs_s, in_s, D, BLOCK_D)
    if RETRIEVAL:
        x = _load_rows(x_ptr + head * WIDTH, offs_s, in_s, WIDTH, BLOCK_W)
    else:
        x = keys
    return keys, x


@triton.jit
def _backward_rows_kernel(g_ptr, saved_ptr, stats_ptr, k_ptr, x_ptr, m_ptr, beta_ptr, taken_ptr, dq_ptr,
                          norm_ptr, beta_rows_ptr, step, H, L, K_BATCHED, m_stride_b, m_stride_h, m_stride_l,
                          m_stride_s, S: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr,
                          RETRIEVAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """Step `step`'s gradient of q_t for BLOCK_L rows of one (batch, head), from G, the gradient of the step's
    output (L x WIDTH at g_ptr): dq_t = beta dS K with dS = P (G X^T - D_row). Stores the rows' rescaled 1/sum
    and D_row for the column kernel (norm_ptr) and adds the rows' share of grad_beta, q_t . (dS K), to
    beta_rows."""
    pid_l, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    rows = bh * L + offs_l
    q = _load_rows(saved_ptr + (step * BH + bh) * L * D, offs_l, in_l, D, BLOCK_D)
    bq = tl.load(beta_ptr).to(tl.float32) * q
    g = _load_rows(g_ptr + bh * L * WIDTH, offs_l, in_l, WIDTH, BLOCK_W)
    top = tl.load(stats_ptr + (step * BH * L + rows) * 2, mask=in_l, other=0.0)
    inv_sum = tl.load(stats_ptr + (step * BH * L + rows) * 2 + 1, mask=in_l, other=0.0)  # 0: P is 0 outside L
    head = (b * K_BATCHED * H + h) * S  # first stored pattern of this head (batch 0 when they are shared)
    m_base = m_ptr + b * m_stride_b + h * m_stride_h
    if not RETRIEVAL:
        # only the rows still updating at this step have q_{t+1} = P K; the others pass their gradient through
        active = tl.load(taken_ptr + rows, mask=in_l, other=0) > step
        passed = g
        g = tl.where(active[:, None], g, 0.0)
    # A first pass over S for rowsum(P), which rescales P to sum to 1: unless the logits here round exactly as
    # the forward's did, exp(logits - max) is off by up to |logits| * 2^-24 relative, mostly by one factor per
    # row, and where P is nearly one-hot (a converged row) the true dS is tiny and that factor's share
    # dominates it (grad_beta came out 10 to 100 times less accurate than the PyTorch kernel's without it).
    # The same pass gives D_row = rowsum(P * dP) over the rescaled P, in place of FlashAttention-2's
    # rowsum(G * O), which has no O for the retrieval and whose O would not match the rescaled P.
    p_dp = tl.zeros([BLOCK_L], tl.float32)
    p_sum = tl.zeros([BLOCK_L], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        keys, x = _tiles(k_ptr, x_ptr, head, offs_s, in_s, D, WIDTH, RETRIEVAL, BLOCK_D, BLOCK_W)
        p = _association(bq, keys, top, inv_sum, m_base, m_stride_l, m_stride_s, offs_l, in_l, offs_s, in_s,
                         HAS_MASK)
        p_dp += tl.sum(p * tl.dot(g, tl.trans(x), input_precision="ieee"), axis=1)
        p_sum += tl.sum(p, axis=1)
    p_sum = tl.where(in_l, p_sum, 1.0)  # rows outside L have P = 0: no 0 / 0
    inv_sum = inv_sum / p_sum
    delta = p_dp / p_sum
    tl.store(norm_ptr + rows * 2, inv_sum, mask=in_l)
    tl.store(norm_ptr + rows * 2 + 1, delta, mask=in_l)
    ds_k = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        keys, x = _tiles(k_ptr, x_ptr, head, offs_s, in_s, D, WIDTH, RETRIEVAL, BLOCK_D, BLOCK_W)
        p = _association(bq, keys, top, inv_sum, m_base, m_stride_l, m_stride_s, offs_l, in_l, offs_s, in_s,
                         HAS_MASK)
        ds = p * (tl.dot(g, tl.trans(x), input_precision="ieee") - delta[:, None])
        ds_k += tl.dot(ds, keys, input_precision="ieee")
    # one program owns these rows at every step: read-add-write, no atomics
    beta_rows = beta_rows_ptr + rows
    tl.store(beta_rows, tl.load(beta_rows, mask=in_l, other=0.0) + tl.sum(q * ds_k, axis=1), mask=in_l)
    dq = tl.load(beta_ptr).to(tl.float32) * ds_k
    if not RETRIEVAL:
        dq = tl.where(active[:, None], dq, passed)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], dq, mask=in_l[:, None] & (offs_d[None, :] < D))


@triton.jit
def _backward_columns_kernel(g_ptr, saved_ptr, stats_ptr, k_ptr, x_ptr, m_ptr, beta_ptr, taken_ptr, norm_ptr,
                             dk_ptr, dv_ptr, step, H, K_BATCHED, m_stride_b, m_stride_h, m_stride_l, m_stride_s,
                             L: tl.constexpr, S: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr,
                             RETRIEVAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """Step `step`'s gradients of BLOCK_S stored patterns of one (batch, head), over all L rows: beta dS^T q_t
    through the logits and P^T G through the product with X (V for the retrieval, K again for an update). The
    retrieval comes first in the backward and writes grad_k and grad_v; each update adds to grad_k."""
    pid_s, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    in_s = offs_s < S
    head = (b * K_BATCHED * H + h) * S
    keys, x = _tiles(k_ptr, x_ptr, head, offs_s, in_s, D, WIDTH, RETRIEVAL, BLOCK_D, BLOCK_W)
    beta = tl.load(beta_ptr).to(tl.float32)
    m_base = m_ptr + b * m_stride_b + h * m_stride_h
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dx = tl.zeros([BLOCK_S, BLOCK_W], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        rows = bh * L + offs_l
        bq = beta * _load_rows(saved_ptr + (step * BH + bh) * L * D, offs_l, in_l, D, BLOCK_D)
        g = _load_rows(g_ptr + bh * L * WIDTH, offs_l, in_l, WIDTH, BLOCK_W)
        if not RETRIEVAL:
            g = tl.where((tl.load(taken_ptr + rows, mask=in_l, other=0) > step)[:, None], g, 0.0)
        top = tl.load(stats_ptr + (step * BH * L + rows) * 2, mask=in_l, other=0.0)
        inv_sum = tl.load(norm_ptr + rows * 2, mask=in_l, other=0.0)
        delta = tl.load(norm_ptr + rows * 2 + 1, mask=in_l, other=0.0)
        p = _association(bq, keys, top, inv_sum, m_base, m_stride_l, m_stride_s, offs_l, in_l, offs_s, in_s,
                         HAS_MASK)
        ds = p * (tl.dot(g, tl.trans(x), input_precision="ieee") - delta[:, None])
        dk += tl.dot(tl.trans(ds), bq, input_precision="ieee")
        dx += tl.dot(tl.trans(p), g, input_precision="ieee")
    offs_d = tl.arange(0, BLOCK_D)
    dk_ptrs = dk_ptr + (bh * S + offs_s[:, None]) * D + offs_d[None, :]
    dk_mask = in_s[:, None] & (offs_d[None, :] < D)
    if RETRIEVAL:
        offs_w = tl.arange(0, BLOCK_W)
        tl.store(dv_ptr + (bh * S + offs_s[:, None]) * WIDTH + offs_w[None, :], dx,
                 mask=in_s[:, None] & (offs_w[None, :] < WIDTH))
        tl.store(dk_ptrs, dk, mask=dk_mask)
    else:
        tl.store(dk_ptrs, tl.load(dk_ptrs, mask=dk_mask, other=0.0) + dk + dx, mask=dk_mask)


def supports_backward(q) -> bool:
    """Whether the Triton backward covers a call (else the PyTorch kernel runs): float32, any stopping."""
    return q.dtype == torch.float32


def backward(grad, q, k, v, beta, mask, saved_q, stats, taken):
    """(grad_q, grad_k, grad_v, grad_beta) of accel::hopfield_update_backward, as the PyTorch kernel returns them.

    Per step from the retrieval backwards, FlashAttention-2's split: a kernel over blocks of rows computes dq_t
    (and D_row, and grad_beta's share per row), then a kernel over blocks of stored patterns accumulates dk (and
    dv) over all rows, so every output element has one writer and the result is deterministic (no atomics)."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    steps = saved_q.shape[0] - 1
    k, v, grad = k.contiguous(), v.contiguous(), grad.contiguous()
    saved_q, stats, taken = saved_q.contiguous(), stats.contiguous(), taken.contiguous()
    # dq_{t+1} and dq_t: two buffers used in turn; the last one written is grad_q
    dq = [torch.empty(B, H, L, D, dtype=q.dtype, device=q.device) for _ in range(min(2, steps + 1))]
    norm = torch.empty(B, H, L, 2, dtype=torch.float32, device=q.device)  # per step: rescaled 1/sum, D_row
    beta_rows = torch.zeros(B, H, L, dtype=torch.float32, device=q.device)
    grad_k = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    grad_v = torch.empty(B, H, S, DV, dtype=q.dtype, device=q.device)
    mask, strides, BLOCK_L, BLOCK_D, BLOCK_DV = _launch_layout(q, mask, S, DV)
    BLOCK_S = 64 if S >= 64 else max(16, triton.next_power_of_2(S))
    K_BATCHED = int(k.shape[0] == B and B > 1)
    beta = beta.reshape(1)
    g = grad
    for t in range(steps, -1, -1):
        retrieval = t == steps
        x, width, block_w = (v, DV, BLOCK_DV) if retrieval else (k, D, BLOCK_D)
        dq_t = dq[t % 2]
        common = dict(S=S, D=D, WIDTH=width, RETRIEVAL=retrieval, HAS_MASK=mask is not q, BLOCK_L=BLOCK_L,
                      BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, BLOCK_W=block_w, num_warps=4)
        _backward_rows_kernel[(triton.cdiv(L, BLOCK_L), B * H)](
            g, saved_q, stats, k, x, mask, beta, taken, dq_t, norm, beta_rows, t, H, L, K_BATCHED, *strides,
            **common)
        _backward_columns_kernel[(triton.cdiv(S, BLOCK_S), B * H)](
            g, saved_q, stats, k, x, mask, beta, taken, norm, grad_k, grad_v, t, H, K_BATCHED, *strides, L=L,
            **common)
        g = dq_t
    if k.shape[0] == 1 and B != 1:  # stored patterns shared by the batch
        grad_k, grad_v = grad_k.sum(0, keepdim=True), grad_v.sum(0, keepdim=True)
    return g, grad_k, grad_v, beta_rows.sum(dtype=torch.float64).to(beta.dtype)
