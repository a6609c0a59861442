"""Triton kernels for accel::causal_conv and accel::causal_conv_backward on CUDA tensors.

The convolution is the C++ CPU kernel's (csrc/cpu/causal_conv.cpp): both kernels laid into one length-2L
circular kernel, spectra by cuFFT with time as the last axis. What Triton fuses is the pass around the FFTs:

* forward, ``_epilogue_kernel``: y[b, t, h, m] = act(z[b, h, m, t] + D[h, m] u[b, t, h]) reads the inverse
  FFT's time-last output once and writes y batch-first, so the slice to L, the transpose, the skip and the
  GELU are one pass instead of four;
* backward, ``_gradient_kernel``: gz[b, h, m, t] = grad[b, t, h, m] act'(z + D u), with z recomputed from the
  spectra (nothing of size B L H M is saved by the forward), written time-last for the FFTs of the
  backward, so the transpose and the GELU's derivative are one pass.
"""
import torch
import triton
import triton.language as tl

from accel.reference.lssl import circular_kernel

BLOCK_T = 64
BLOCK_C = 32  # (h, m) columns per program


@triton.jit
def _tile(L, HM, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # h * M + m
    mask = (t[:, None] < L) & (col[None, :] < HM)
    return t, col, mask


@triton.jit
def _pre_activation(z_ptr, u_ptr, D_ptr, b, t, col, mask, L, Lz, H, HM, M, HAS_D: tl.constexpr):
    """z + D u on a (BLOCK_T, BLOCK_C) tile, in float32 (float64 for float64 inputs)."""
    z = tl.load(z_ptr + (b * HM + col[None, :]) * Lz + t[:, None], mask=mask, other=0.0)
    if HAS_D:
        h = col // M
        u = tl.load(u_ptr + (b * L + t[:, None]) * H + h[None, :], mask=mask, other=0.0)
        z += tl.load(D_ptr + col, mask=col < HM, other=0.0)[None, :] * u
    return z


@triton.jit
def _epilogue_kernel(z_ptr, u_ptr, D_ptr, y_ptr, L, Lz, H, HM, M, HAS_D: tl.constexpr, GELU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t, col, mask = _tile(L, HM, BLOCK_T, BLOCK_C)
    z = _pre_activation(z_ptr, u_ptr, D_ptr, b, t, col, mask, L, Lz, H, HM, M, HAS_D)
    if GELU:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    tl.store(y_ptr + (b * L + t[:, None]) * HM + col[None, :], z, mask=mask)


@triton.jit
def _gradient_kernel(grad_ptr, z_ptr, u_ptr, D_ptr, gz_ptr, L, Lz, H, HM, M, HAS_D: tl.constexpr,
                     GELU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t, col, mask = _tile(L, HM, BLOCK_T, BLOCK_C)
    g = tl.load(grad_ptr + (b * L + t[:, None]) * HM + col[None, :], mask=mask, other=0.0)
    if GELU:
        z = _pre_activation(z_ptr, u_ptr, D_ptr, b, t, col, mask, L, Lz, H, HM, M, HAS_D)
        # gelu'(z) = Phi(z) + z phi(z)
        g *= 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(gz_ptr + (b * HM + col[None, :]) * L + t[:, None], g, mask=mask)


def _grid(B, L, HM):
    return (B, triton.cdiv(L, BLOCK_T), triton.cdiv(HM, BLOCK_C))


def _spectra(u, K, K_reverse):
    """U (B, H, L + 1) of u with time last and Kf (H, M, L + 1) of the length-2L circular kernel."""
    L = u.shape[1]
    return torch.fft.rfft(u.transpose(1, 2), n=2 * L), torch.fft.rfft(circular_kernel(K, K_reverse, L), n=2 * L)


def _conv(U, Kf, L):
    """The convolution without the skip, time-last: (B, H, M, 2L), of which the first L are y's."""
    return torch.fft.irfft(U.unsqueeze(2) * Kf, n=2 * L).contiguous()


def forward(u, K, D, activation, K_reverse):
    u = u.contiguous()
    B, L, H = u.shape
    M = K.shape[1]
    U, Kf = _spectra(u, K, K_reverse)
    z = _conv(U, Kf, L)
    y = torch.empty(B, L, H, M, dtype=u.dtype, device=u.device)
    D_arg = D.contiguous() if D is not None else u
    _epilogue_kernel[_grid(B, L, H * M)](z, u, D_arg, y, L, 2 * L, H, H * M, M, HAS_D=D is not None,
                                         GELU=activation == "gelu", BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return y


def backward(grad, u, K, D, activation, K_reverse):
    u, grad = u.contiguous(), grad.contiguous()
    B, L, H = u.shape
    M, Lk = K.shape[1], K.shape[2]
    U, Kf = _spectra(u, K, K_reverse)
    z = _conv(U, Kf, L) if activation == "gelu" else u  # z is read only for the GELU's derivative
    gz = torch.empty(B, H, M, L, dtype=u.dtype, device=u.device)
    D_arg = D.contiguous() if D is not None else u
    _gradient_kernel[_grid(B, L, H * M)](grad, z, u, D_arg, gz, L, 2 * L, H, H * M, M, HAS_D=D is not None,
                                         GELU=activation == "gelu", BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    G = torch.fft.rfft(gz, n=2 * L)  # (B, H, M, L + 1)
    # grad u[t] = sum_m sum_p k[p] gz[t + p]: a correlation, conj(Kf) G; plus the skip's sum_m D gz
    gu = torch.fft.irfft((G * Kf.conj()).sum(2), n=2 * L)[..., :L]
    if D is not None:
        gu = gu + (gz * D.unsqueeze(-1)).sum(2)
    # grad k[p] = sum_b sum_t gz[t] u[t - p mod 2L]: conj(U) G summed over the batch. Products and sums written
    # out rather than as einsum, which turns these into batched products of tiny (complex) matrices.
    gk = torch.fft.irfft((G * U.conj().unsqueeze(2)).sum(0), n=2 * L)  # (H, M, 2L)
    gK = gk[..., :Lk].contiguous()
    gKr = gk[..., 2 * L - K_reverse.shape[2]:].flip(-1).contiguous() if K_reverse is not None else u.new_empty(0)
    gD = u.new_empty(0)
    if D is not None:  # a sum over B L terms: accumulated in float64, as the CPU kernel's
        gD = (gz.double() * u.transpose(1, 2).unsqueeze(2).double()).sum((0, 3)).to(u.dtype)
    return gu.transpose(1, 2).contiguous(), gK, gD, gKr
