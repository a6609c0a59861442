"""Triton kernels for accel::int8_linear and accel::int4_linear on CUDA tensors.

int8_linear: the activations are quantized per row by torch (one small pass), then each program computes a
BLOCK_M x BLOCK_N tile with int8 tl.dot accumulating in int32 (the tensor cores' int8 path on the GPU), scaled
back with the row and channel steps and the bias in the epilogue.

int4_linear: each program streams 32 codes (16 bytes) of its BLOCK_N channels at a time: the low and high
nibbles are codes j and j + 16, joined as (j, half) pairs; the activations are loaded in that same order, so no
shuffle is needed. The codes are dequantized in registers (code * step + offset of their group) and multiplied
with tl.dot in IEEE float32. Kp and the group size are compile-time constants: loops with run-time bounds fail in
Triton 3.6's interpreter.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _int8_kernel(qx_ptr, sx_ptr, qw_ptr, sw_ptr, bias_ptr, out_ptr, M, N, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int64)  # 127 * 127 * KP passes int32 from KP = 133,145
    for k0 in range(0, KP, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(qx_ptr + offs_m[:, None].to(tl.int64) * KP + offs_k[None, :], mask=in_m[:, None], other=0)
        b = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * KP + offs_k[None, :], mask=in_n[:, None], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32).to(tl.int64)
    y = acc.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=in_m, other=0.0)[:, None] \
        * tl.load(sw_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y, mask=in_m[:, None] & in_n[None, :])


def int8_linear(x, w_codes, w_step, bias):
    """accel::int8_linear: x (M, K) float32, w_codes (N, Kp) int8, w_step (N,)."""
    M, K = x.shape
    N, Kp = w_codes.shape
    step_x = x.abs().amax(1) / 127
    qx = torch.where(step_x[:, None] > 0, torch.round(x / step_x[:, None]), 0.0).clamp(-127, 127).to(torch.int8)
    qx = torch.nn.functional.pad(qx, (0, Kp - K)).contiguous()
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int8_kernel[grid](qx, step_x.contiguous(), w_codes.contiguous(), w_step.float().contiguous(),
                       bias.float().contiguous() if bias is not None else out, out, M, N, KP=Kp,
                       HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


@triton.jit
def _int4_kernel(x_ptr, w_ptr, step_ptr, offset_ptr, bias_ptr, out_ptr, M, N, KP: tl.constexpr, G: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    GROUPS: tl.constexpr = KP // G
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = offs_m < M, offs_n < N
    j = tl.arange(0, 16)
    # code index within a block of 32 in (j, half) order: j + 16 * half
    order = tl.reshape(j[:, None] + 16 * tl.arange(0, 2)[None, :], [32])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, KP, 32):
        g = k0 // G
        packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * (KP // 2) + k0 // 2 + j[None, :],
                         mask=in_n[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, (packed >> 4) & 15), [BLOCK_N, 32]).to(tl.float32)
        step = tl.load(step_ptr + offs_n * GROUPS + g, mask=in_n, other=0.0)
        offset = tl.load(offset_ptr + offs_n * GROUPS + g, mask=in_n, other=0.0)
        w = codes * step[:, None] + offset[:, None]
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * KP + k0 + order[None, :], mask=in_m[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=in_m[:, None] & in_n[None, :])


def int4_linear(x, w_packed, step, offset, group_size, bias):
    """accel::int4_linear: x (M, Kp) float32 (zero-padded), w_packed (N, Kp / 2) uint8, step and offset (N, Kp / G)."""
    M, Kp = x.shape
    N = w_packed.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    BLOCK_M, BLOCK_N = 16, 32
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int4_kernel[grid](x.float().contiguous(), w_packed.contiguous(), step.float().contiguous(),
                       offset.float().contiguous(), bias.float().contiguous() if bias is not None else out, out, M, N,
                       KP=Kp, G=group_size, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out
