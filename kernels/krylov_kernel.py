"""Triton kernels for accel::krylov_kernel and accel::krylov_kernel_backward on CUDA tensors.

The algorithm is the C++ CPU kernel's (csrc/cpu/krylov_kernel.cpp), in float64 for the same reason: blocks
of c steps, the powers S_k = dA^(2^k) by squaring (P = dA^c), the chains W_i = C dA^i (i < c) and
v_j = P^j dB (j < J), and K[:, j c + i] = W_i v_j; the backward runs the chains' adjoints and the squarings'
adjoint with the formulas written there. On a GPU the batched products (squarings, the final product and the
gradient products) are cuBLAS float64 GEMMs over all features at once; what cannot be batched is the
sequential chains, c and J steps long, and those run in ``_chain_kernel``: one program per (feature, row)
keeps its state in registers and walks all steps in one launch, where PyTorch would launch one tiny product
per step. c is a power of two near sqrt(L), so the two chains have about the same number of steps.
"""
import torch
import triton
import triton.language as tl

from accel.ops.krylov_kernel import block


@triton.jit
def _chain_kernel(x0_ptr, mat_ptr, adds_ptr, out_ptr, R, N: tl.constexpr, T: tl.constexpr, HAS_ADDS: tl.constexpr, BACKWARDS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[h, t, r] = out[h, t -/+ 1, r] @ mat[h] + adds[h, t, r] for one (feature h, row r), from x0[h, r].

    N and T are compile-time constants (one compilation per state size and chain length, a handful per
    model): loops with run-time bounds fail in Triton 3.6's interpreter.

    Each step reads the previous state back from out (written by this program; the barrier makes it
    visible to all its threads) and computes the new one in column blocks of BLOCK_J, mat's block coming
    from L1/L2 after the first step.
    """
    h, r = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p = tl.arange(0, BLOCK_N)
    in_p = p < N
    row_stride = R * N
    x0 = tl.load(x0_ptr + (h * R + r) * N + p, mask=in_p, other=0.0)
    if BACKWARDS:
        tl.store(out_ptr + ((h * T + T - 1) * R + r) * N + p, x0, mask=in_p)
    else:
        tl.store(out_ptr + (h * T * R + r) * N + p, x0, mask=in_p)
    for k in range(1, T):
        if BACKWARDS:
            t = T - 1 - k
            prev = t + 1
        else:
            t = k
            prev = k - 1
        tl.debug_barrier()
        x = tl.load(out_ptr + ((h * T + prev) * R + r) * N + p, mask=in_p, other=0.0)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            in_j = j < N
            m = tl.load(mat_ptr + h * N * N + p[:, None] * N + j[None, :], mask=in_p[:, None] & in_j[None, :],
                        other=0.0)
            y = tl.sum(x[:, None] * m, axis=0)
            if HAS_ADDS:
                y += tl.load(adds_ptr + (h * T + t) * row_stride + r * N + j, mask=in_j, other=0.0)
            tl.store(out_ptr + (h * T + t) * row_stride + r * N + j, y, mask=in_j)


def chain(x0: torch.Tensor, mat: torch.Tensor, adds: torch.Tensor | None, T: int, backwards: bool = False):
    """The row-vector recurrence of csrc/cpu/krylov_kernel.cpp's chain(): x0 (H, R, N), mat (H, N, N), adds
    (H, T, R, N) or None; forwards x_0 = x0, x_t = x_{t-1} mat + adds_t; backwards x_{T-1} = x0,
    x_t = x_{t+1} mat + adds_t. Returns the x_t as (H, T, R, N)."""
    H, R, N = x0.shape
    x0, mat = x0.contiguous(), mat.contiguous()
    adds = adds.contiguous() if adds is not None else x0
    out = torch.empty(H, T, R, N, dtype=x0.dtype, device=x0.device)
    BLOCK_N = triton.next_power_of_2(N)
    # mat's block of BLOCK_N x BLOCK_J float64 values is spread over the program's threads: 32 per thread.
    BLOCK_J = max(1, min(BLOCK_N, 4096 // BLOCK_N))
    _chain_kernel[(H, R)](x0, mat, adds, out, R, N, T, HAS_ADDS=adds is not x0, BACKWARDS=backwards,
                          BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J, num_warps=4)
    return out


def _chains(dA, dB, C, L):
    c = block(L)
    J = -(-L // c)
    S = [dA]
    while len(S) < c.bit_length():  # S_k = dA^(2^k), k = 0 .. log2(c)
        S.append(S[-1] @ S[-1])
    W = chain(C, dA, None, c)  # (H, c, M, N)
    V = chain(dB.unsqueeze(1), S[-1].transpose(1, 2), None, J).squeeze(2)  # (H, J, N)
    return S, W, V, c, J


def forward(dA, dB, C, L):
    dtype = dA.dtype
    dA, dB, C = dA.double(), dB.double(), C.double()
    H, M = C.shape[0], C.shape[1]
    S, W, V, c, J = _chains(dA, dB, C, L)
    # K[m, j c + i] = v_j . W_i[m]
    K = torch.einsum("hjn,himn->hmji", V, W).reshape(H, M, J * c)
    return K[..., :L].to(dtype).contiguous()


def backward(grad, dA, dB, C, L):
    """The adjoints of csrc/cpu/krylov_kernel.cpp's backward_cpu, batched over features."""
    dtype = dA.dtype
    dA, dB, C = dA.double(), dB.double(), C.double()
    H, M, N = C.shape
    S, W, V, c, J = _chains(dA, dB, C, L)
    G = torch.nn.functional.pad(grad.double(), (0, J * c - L)).view(H, M, J, c)
    dW = torch.einsum("hmji,hjn->himn", G, V)  # (H, c, M, N)
    dV = torch.einsum("hmji,himn->hjn", G, W)  # (H, J, N)
    A = chain(dV[:, J - 1].unsqueeze(1), S[-1], dV.unsqueeze(2), J, backwards=True).squeeze(2)
    g = A[:, 1:].transpose(1, 2) @ V[:, :-1]  # dP = sum_{j>=1} a_j v_{j-1}^T
    Bc = chain(dW[:, c - 1], dA.transpose(1, 2), dW, c, backwards=True)  # (H, c, M, N)
    gA = W[:, :-1].reshape(H, -1, N).transpose(1, 2) @ Bc[:, 1:].reshape(H, -1, N)
    for Sk in reversed(S[:-1]):
        ST = Sk.transpose(1, 2)
        g = g @ ST + ST @ g
    gA = gA + g
    return gA.to(dtype).contiguous(), A[:, 0].to(dtype).contiguous(), Bc[:, 0].to(dtype).contiguous()
