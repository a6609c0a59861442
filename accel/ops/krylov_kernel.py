"""accel.ops.krylov_kernel: the LSSL convolution kernel K[h, m, l] = (C_h dA_h^l dB_h)[m] without the
(H, N, L) Krylov tensor.

Flow: krylov_kernel (checks) -> torch.ops.accel.krylov_kernel -> C++ kernel on the CPU
(csrc/cpu/krylov_kernel.cpp: blocks of c steps, W_i = C dA^i, v_j = (dA^c)^j dB, K[j c + i] = W_i v_j), Triton
chains and cuBLAS products on CUDA (kernels/krylov_kernel.py), the same blocked algorithm in PyTorch
elsewhere. The backward is the op accel::krylov_kernel_backward, with
hand-derived adjoints of the three recurrences.
"""
import torch
from torch import Tensor

from accel.ops._library import lib, register_backends, triton_kernel

lib.define("krylov_kernel(Tensor dA, Tensor dB, Tensor C, int L) -> Tensor")
lib.define("krylov_kernel_backward(Tensor grad, Tensor dA, Tensor dB, Tensor C, int L) -> (Tensor, Tensor, Tensor)")

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def krylov_kernel(dA: Tensor, dB: Tensor, C: Tensor, L: int) -> Tensor:
    """K (H, M, L) with ``K[h, :, l] = C[h] @ matrix_power(dA[h], l) @ dB[h]``.

    Args:
        dA: (H, N, N) discrete state matrices, one per feature.
        dB: (H, N) discrete input vectors.
        C: (H, M, N) output matrices (M output channels).
        L: kernel length, >= 1.

    Cost per feature O(log(c) N^3 + c M N^2 + (L / c) N^2 + L M N) for a block c chosen per call, memory
    O(N^2 log c + c M N + L / c N): the (H, N, L) tensor of the reference method is never formed.
    """
    for name, t, dim in (("dA", dA, 3), ("dB", dB, 2), ("C", C, 3)):
        if not isinstance(t, Tensor):
            raise TypeError(f"krylov_kernel: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"krylov_kernel: `{name}` must have {dim} dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"krylov_kernel: `{name}` must be float32 or float64, got {t.dtype}")
        if t.dtype != dA.dtype or t.device != dA.device:
            raise ValueError(f"krylov_kernel: `{name}` is {t.dtype} on {t.device} but `dA` is {dA.dtype} on {dA.device}")
    H, N = dA.shape[0], dA.shape[1]
    if dA.shape != (H, N, N):
        raise ValueError(f"krylov_kernel: `dA` must have shape (H, N, N), got {tuple(dA.shape)}")
    if dB.shape != (H, N):
        raise ValueError(f"krylov_kernel: `dB` must have shape (H, N) = ({H}, {N}), got {tuple(dB.shape)}")
    if C.shape[0] != H or C.shape[2] != N:
        raise ValueError(f"krylov_kernel: `C` must have shape (H, M, N) = ({H}, M, {N}), got {tuple(C.shape)}")
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"krylov_kernel: `L` must be an int >= 1, got {L!r}")
    return torch.ops.accel.krylov_kernel(dA, dB, C, L)


@torch.library.register_fake("accel::krylov_kernel")
def _fake(dA, dB, C, L):
    return dA.new_empty(dA.shape[0], C.shape[1], L)


@torch.library.register_fake("accel::krylov_kernel_backward")
def _backward_fake(grad, dA, dB, C, L):
    return torch.empty_like(dA, memory_format=torch.contiguous_format), \
        torch.empty_like(dB, memory_format=torch.contiguous_format), \
        torch.empty_like(C, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    dA, dB, C, L = inputs
    ctx.save_for_backward(dA, dB, C)
    ctx.L = L


def _backward(ctx, grad):
    dA, dB, C = ctx.saved_tensors
    gA, gB, gC = torch.ops.accel.krylov_kernel_backward(grad, dA, dB, C, ctx.L)
    return gA, gB, gC, None


torch.library.register_autograd("accel::krylov_kernel", _backward, setup_context=_setup_context)


def blocked_krylov(dA: Tensor, dB: Tensor, C: Tensor, L: int, c: int) -> Tensor:
    """The C++ kernel's algorithm in PyTorch, batched over features (fallback kernel, and its readable form)."""
    W = [C]
    for _ in range(c - 1):
        W.append(W[-1] @ dA)
    P = torch.linalg.matrix_power(dA, c)
    V = [dB]
    for _ in range(-(-L // c) - 1):
        V.append((P @ V[-1].unsqueeze(-1)).squeeze(-1))
    # (H, c, M, N) x (H, J, N) -> (H, M, J, c) -> (H, M, J c)
    K = torch.einsum("hcmn,hjn->hmjc", torch.stack(W, 1), torch.stack(V, 1))
    return K.reshape(K.shape[0], K.shape[1], -1)[..., :L].contiguous()


def block(L: int) -> int:
    """c for the PyTorch and Triton paths: the power of two near sqrt(L), so that the two chains have about as
    many steps (csrc/cpu/krylov_kernel.cpp picks c by a CPU cost model instead)."""
    c = 1
    while c * c * 4 <= L:
        c *= 2
    return c


def _reference_forward(dA, dB, C, L):
    with torch.no_grad():
        return blocked_krylov(dA, dB, C, L, block(L))


def _reference_backward(grad, dA, dB, C, L):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (dA, dB, C)]
        K = blocked_krylov(*inputs, L, block(L))
        return tuple(g.contiguous() for g in torch.autograd.grad(K, inputs, grad))


register_backends("krylov_kernel", _reference_forward, triton_kernel("krylov_kernel", "forward"))
register_backends("krylov_kernel_backward", _reference_backward, triton_kernel("krylov_kernel", "backward"))
