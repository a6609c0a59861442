"""Triton kernels for accel::rk_finalize and accel::rk_finalize_backward on CUDA tensors.

Per sample, with e = sum_i b_err[i] k[i] (zero weights skipped, added in the reference's order), err = h e,
sc = atol + rtol max(|y0|, |y1|) and r = err / sc (per element, in the input's dtype):

    norm = sqrt(S / D),  S = sum_d r^2;    rho = sqrt(N) / sqrt(G) (0 where G = 0),
    N = sum_d (k[s-1] - k[s-2])^2,  G = sum_d (y1 - g_prev)^2,

the three sums accumulated in float64 (float32 inputs too, as in csrc/cpu/rk_finalize.cpp).

Forward, ``_forward_kernel``: one program per BLOCK_B samples loops over D in BLOCK_D pieces.
Backward, ``_backward_kernel``: the same program first sums S, N, G (the forward's loop), then writes, in a
second loop over D, the gradients (see the CPU kernel's comment for their derivation):

    q = gn r / (D norm sc) (0 when norm = 0);  dk[i] = b_err[i] h q;  dh = sum_d e q (float64);
    dsc = -q r, reaching y0 or y1 through rtol and the max (half each at a tie, like torch.maximum; sgn(0) = 0);
    dk[s-1] += gr (k[s-1] - k[s-2]) / (sqrt(N) sqrt(G)), dk[s-2] -= the same;
    dy1 -= gr rho (y1 - g_prev) / G, dg_prev += the same  (0 when G = 0 or N = 0).

The weights, rtol and atol reach the kernels as small cached tensors in the input's dtype (a Python float
argument would be rounded to float32). D, the stage count S and the count of nonzero weights M are compile-time
constants: loops with run-time bounds fail in Triton 3.6's interpreter.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 128
TILE = 1024  # BLOCK_B * BLOCK_D elements per loop step

_parameters_cache: dict = {}


def _parameters(b_err, rtol, atol, s, dtype, device):
    """(nonzero weights, their stage indices (int64), every stage's weight (s,), [rtol, atol]), cached."""
    key = (tuple(float(x) for x in b_err), float(rtol), float(atol), s, dtype, device)
    found = _parameters_cache.get(key)
    if found is None:
        nonzero = [(i, float(bi)) for i, bi in enumerate(b_err) if bi != 0.0]
        found = (torch.tensor([c for _, c in nonzero] or [0.0], dtype=dtype, device=device),
                 torch.tensor([i for i, _ in nonzero] or [0], dtype=torch.int64, device=device),
                 torch.tensor([float(bi) for bi in b_err], dtype=dtype, device=device),
                 torch.tensor([float(rtol), float(atol)], dtype=dtype, device=device))
        if len(_parameters_cache) > 256:
            _parameters_cache.clear()
        _parameters_cache[key] = found
    return found


@triton.jit
def _error_sum(k_ptr, coef_ptr, idx_ptr, offs, mask, stage_stride, M: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """sum_i coef[i] k[idx[i]] at the offsets `offs`, added in order (0 when M = 0)."""
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
def _tile(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows, in_rows, h, rtol, atol, d0, B,
          D: tl.constexpr, S: tl.constexpr, M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (BLOCK_B, BLOCK_D) tile's per-element values: offsets, mask, y0, y1, e, sc, r, dk, dy."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = in_rows[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    stage_stride = B * D
    y0 = tl.load(y0_ptr + offs, mask=mask, other=0.0)
    y1 = tl.load(y1_ptr + offs, mask=mask, other=0.0)
    g_prev = tl.load(g_ptr + offs, mask=mask, other=0.0)
    k_last = tl.load(k_ptr + (S - 1) * stage_stride + offs, mask=mask, other=0.0)
    k_before = tl.load(k_ptr + (S - 2) * stage_stride + offs, mask=mask, other=0.0)
    e = _error_sum(k_ptr, coef_ptr, idx_ptr, offs, mask, stage_stride, M, BLOCK_B, BLOCK_D, y0.dtype)
    a0, a1 = tl.abs(y0), tl.abs(y1)
    # torch.maximum's rule: a NaN in either wins
    big = tl.where((a0 < a1) | (a1 != a1), a1, a0)
    sc = tl.where(mask, atol + rtol * big, 1.0)  # masked elements: 1, not atol (which may be 0): r = 0 there
    r = (h[:, None] * e) / sc
    dk = k_last - k_before
    dy = y1 - g_prev
    return offs, mask, y0, y1, e, sc, r, dk, dy


@triton.jit
def _sums(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows, in_rows, h, rtol, atol, B, D: tl.constexpr,
          S: tl.constexpr, M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(S, N, G) per sample in float64, masked elements contributing 0."""
    s_sum = tl.zeros([BLOCK_B], tl.float64)
    n_sum = tl.zeros([BLOCK_B], tl.float64)
    g_sum = tl.zeros([BLOCK_B], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs, mask, y0, y1, e, sc, r, dk, dy = _tile(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows,
                                                     in_rows, h, rtol, atol, d0, B, D, S, M, BLOCK_B, BLOCK_D)
        s_sum += tl.sum((r * r).to(tl.float64), axis=1)
        n_sum += tl.sum((dk * dk).to(tl.float64), axis=1)
        g_sum += tl.sum((dy * dy).to(tl.float64), axis=1)
    return s_sum, n_sum, g_sum


@triton.jit
def _forward_kernel(y0_ptr, y1_ptr, k_ptr, g_ptr, h_ptr, coef_ptr, idx_ptr, tol_ptr, norm_ptr, rho_ptr, B,
                    D: tl.constexpr, S: tl.constexpr, M: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    in_rows = rows < B
    h = tl.load(h_ptr + rows, mask=in_rows, other=0.0)
    rtol = tl.load(tol_ptr)
    atol = tl.load(tol_ptr + 1)
    s_sum, n_sum, g_sum = _sums(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows, in_rows, h, rtol, atol, B,
                                D, S, M, BLOCK_B, BLOCK_D)
    norm = tl.sqrt(s_sum / D)
    rho = tl.where(g_sum != 0, tl.sqrt(n_sum) / tl.sqrt(tl.where(g_sum != 0, g_sum, 1.0)), 0.0)  # NaN stays NaN
    tl.store(norm_ptr + rows, norm.to(h.dtype), mask=in_rows)
    tl.store(rho_ptr + rows, rho.to(h.dtype), mask=in_rows)


@triton.jit
def _backward_kernel(gn_ptr, gr_ptr, y0_ptr, y1_ptr, k_ptr, g_ptr, h_ptr, coef_ptr, idx_ptr, full_ptr, tol_ptr,
                     gy0_ptr, gy1_ptr, gk_ptr, gg_ptr, gh_ptr, B, D: tl.constexpr, S: tl.constexpr,
                     M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    in_rows = rows < B
    h = tl.load(h_ptr + rows, mask=in_rows, other=0.0)
    gn = tl.load(gn_ptr + rows, mask=in_rows, other=0.0)
    gr = tl.load(gr_ptr + rows, mask=in_rows, other=0.0)
    rtol = tl.load(tol_ptr)
    atol = tl.load(tol_ptr + 1)
    s_sum, n_sum, g_sum = _sums(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows, in_rows, h, rtol, atol, B,
                                D, S, M, BLOCK_B, BLOCK_D)
    norm = tl.sqrt(s_sum / D)
    # per-sample factors, in float64, then in the input's dtype for the per-element products
    q_factor = tl.where(norm != 0, gn.to(tl.float64) / (D * tl.where(norm != 0, norm, 1.0)), 0.0).to(h.dtype)
    nd = tl.sqrt(n_sum) * tl.sqrt(g_sum)
    k_factor = tl.where(nd != 0, gr.to(tl.float64) / tl.where(nd != 0, nd, 1.0), 0.0).to(h.dtype)
    # gr rho / G = gr sqrt(N) / G^(3/2)
    g_safe = tl.where(g_sum != 0, g_sum, 1.0)
    y_factor = tl.where(nd != 0, gr.to(tl.float64) * tl.sqrt(n_sum) / (tl.sqrt(g_safe) * g_safe), 0.0).to(h.dtype)
    stage_stride = B * D
    gh = tl.zeros([BLOCK_B], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs, mask, y0, y1, e, sc, r, dk, dy = _tile(y0_ptr, y1_ptr, k_ptr, g_ptr, coef_ptr, idx_ptr, rows,
                                                     in_rows, h, rtol, atol, d0, B, D, S, M, BLOCK_B, BLOCK_D)
        q = q_factor[:, None] * r / sc  # dL/derr
        gh += tl.sum(tl.where(mask, e * q, 0.0).to(tl.float64), axis=1)
        hq = h[:, None] * q
        gsc = -(q * r) * rtol
        a0, a1 = tl.abs(y0), tl.abs(y1)
        w0 = tl.where(a0 > a1, 1.0, tl.where(a0 == a1, 0.5, 0.0))
        w1 = tl.where(a1 > a0, 1.0, tl.where(a0 == a1, 0.5, 0.0))
        sgn0 = tl.where(y0 > 0, 1.0, tl.where(y0 < 0, -1.0, 0.0))
        sgn1 = tl.where(y1 > 0, 1.0, tl.where(y1 < 0, -1.0, 0.0))
        gdy = -y_factor[:, None] * dy
        tl.store(gy0_ptr + offs, (gsc * w0 * sgn0).to(y0.dtype), mask=mask)
        tl.store(gy1_ptr + offs, (gsc * w1 * sgn1 + gdy).to(y0.dtype), mask=mask)
        tl.store(gg_ptr + offs, (-gdy).to(y0.dtype), mask=mask)
        gdk = k_factor[:, None] * dk
        for i in tl.static_range(S):
            c = tl.load(full_ptr + i)
            gk = tl.where(c != 0.0, c * hq, 0.0)
            if i == S - 1:
                gk = gk + gdk
            if i == S - 2:
                gk = gk - gdk
            tl.store(gk_ptr + i * stage_stride + offs, gk.to(y0.dtype), mask=mask)
    tl.store(gh_ptr + rows, gh.to(h.dtype), mask=in_rows)


def _blocks(B, D):
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    BLOCK_B = min(max(TILE // BLOCK_D, 1), triton.next_power_of_2(B))
    return BLOCK_B, BLOCK_D


def forward(y0, y1, k, g_prev, h, b_err, rtol, atol):
    """accel::rk_finalize: (error_norm (B,), stiffness (B,))."""
    y0, y1, k, g_prev, h = (t.contiguous() for t in (y0, y1, k, g_prev, h))
    s = k.shape[0]
    B, D = y0.shape
    norm, rho = torch.empty_like(h), torch.empty_like(h)
    if B == 0:
        return norm, rho
    if D == 0:  # mean over nothing: NaN, as the reference's; rho: 0 / 0 -> 0
        return norm.fill_(float("nan")), rho.zero_()
    coef, idx, _, tol = _parameters(b_err, rtol, atol, s, y0.dtype, y0.device)
    M = sum(1 for bi in b_err if bi != 0.0)
    BLOCK_B, BLOCK_D = _blocks(B, D)
    _forward_kernel[(triton.cdiv(B, BLOCK_B),)](y0, y1, k, g_prev, h, coef, idx, tol, norm, rho, B, D=D, S=s, M=M,
                                                BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
    return norm, rho


def backward(grad_norm, grad_rho, y0, y1, k, g_prev, h, b_err, rtol, atol):
    """accel::rk_finalize_backward: gradients w.r.t. (y0, y1, k, g_prev, h)."""
    grad_norm, grad_rho, y0, y1, k, g_prev, h = (t.contiguous() for t in (grad_norm, grad_rho, y0, y1, k, g_prev, h))
    s = k.shape[0]
    B, D = y0.shape
    grads = [torch.empty_like(t) for t in (y0, y1, k, g_prev, h)]
    if B == 0:
        return tuple(grads)
    if D == 0:
        return tuple(g.zero_() for g in grads)
    coef, idx, full, tol = _parameters(b_err, rtol, atol, s, y0.dtype, y0.device)
    M = sum(1 for bi in b_err if bi != 0.0)
    BLOCK_B, BLOCK_D = _blocks(B, D)
    _backward_kernel[(triton.cdiv(B, BLOCK_B),)](grad_norm, grad_rho, y0, y1, k, g_prev, h, coef, idx, full, tol,
                                                 *grads, B, D=D, S=s, M=M, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
    return tuple(grads)
