"""Triton kernel for accel::binary_matmul on CUDA tensors: dot products of sign vectors packed 32 to an int32
word, K - 2 popcount(a XOR b), with the scale and bias epilogue fused.

One program computes a BLOCK_M x BLOCK_N tile of the output, streaming BLOCK_W words of its rows of a and b at a
time: the XOR of every (row of a, row of b) pair is a (BLOCK_M, BLOCK_N, BLOCK_W) block of words, counted with
the SWAR popcount (pairs, nibbles, bytes, then one multiply that sums the four bytes), which the GPU runs on its
integer units and the interpreter on numpy. W (the words per row) is a compile-time constant: loops with
run-time bounds fail in Triton 3.6's interpreter.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _popcount(x):
    """Set bits of each uint32 word."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, W: tl.constexpr, HAS_SCALE: tl.constexpr,
            SCALAR_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, FLOAT_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = offs_m < M, offs_n < N
    count = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        in_w = offs_w < W
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * W + offs_w[None, :], mask=in_m[:, None] & in_w[None, :],
                    other=0).to(tl.uint32, bitcast=True)
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * W + offs_w[None, :], mask=in_n[:, None] & in_w[None, :],
                    other=0).to(tl.uint32, bitcast=True)
        bits = _popcount(a[:, None, :] ^ b[None, :, :])  # words past W are 0 in both: they count nothing
        count += tl.sum(bits.to(tl.int32), axis=2)
    dots = K - 2 * count
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    in_out = in_m[:, None] & in_n[None, :]
    if FLOAT_OUT:
        y = dots.to(tl.float32)
        if HAS_SCALE:
            if SCALAR_SCALE:
                y = y * tl.load(scale_ptr)
            else:
                y = y * tl.load(scale_ptr + offs_n, mask=in_n, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
        tl.store(out_ptr + out_offs, y, mask=in_out)
    else:
        tl.store(out_ptr + out_offs, dots, mask=in_out)


def forward(a, b, k, scale, bias):
    """accel::binary_matmul for a (M, W) and b (N, W) int32 on one device."""
    a, b = a.contiguous(), b.contiguous()
    M, W = a.shape
    N = b.shape[0]
    float_out = scale is not None or bias is not None
    out = torch.empty(M, N, dtype=torch.float32 if float_out else torch.int32, device=a.device)
    if M == 0 or N == 0:
        return out
    BLOCK_M, BLOCK_N, BLOCK_W = (16, 32, 8)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _kernel[grid](a, b, scale if scale is not None else out, bias if bias is not None else out, out, M, N, k, W=W,
                  HAS_SCALE=scale is not None, SCALAR_SCALE=scale is not None and scale.numel() == 1,
                  HAS_BIAS=bias is not None, FLOAT_OUT=float_out, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  BLOCK_W=BLOCK_W)
    return out
