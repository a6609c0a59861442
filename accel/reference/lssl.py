"""Linear State-Space Layers (Gu et al., 2021), written as plainly as the paper: the continuous system, its
discretisation, the Krylov convolution kernel and the causal convolution.

A feature h (one of H) with N states and M output channels follows

    x'(t) = A x(t) + B u(t),    y(t) = C x(t) + D u(t)

discretised with step dt to x_k = dA x_{k-1} + dB u_k, y_k = C x_k + D u_k. Unrolled from x_{-1} = 0 this is
a causal convolution y = K * u + D u with the Krylov kernel K_l = C dA^l dB, l = 0..L-1.

The HiPPO matrices are those of the state-spaces/s4 code (hippo.py: 'legs', 'legt', 'lagt', 'fourier' for
FouT); the reference's own Krylov method, repeated squaring of dA (S4's functional/krylov.py), is
`krylov_squaring`, which forms the (H, N, L) Krylov tensor.
"""
import math

import torch
import torch.nn.functional as F

MEASURES = ("legs", "legt", "lagt", "fout")


def hippo(measure: str, N: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO transition (A (N, N), B (N,)) of a measure."""
    q = torch.arange(N, dtype=torch.float64)
    if measure == "legs":  # scaled Legendre
        r = 2 * q + 1
        row, col = q[:, None], q[None, :]
        # A[n, k] = -sqrt(2n + 1) sqrt(2k + 1) below the diagonal, -(n + 1) on it, 0 above
        M = -(torch.where(row >= col, r[None, :].expand(N, N), torch.zeros(N, N)) - torch.diag(q))
        T = torch.sqrt(r)
        A = T[:, None] * M / T[None, :]
        B = T.clone()
    elif measure == "legt":  # translated Legendre
        R = torch.sqrt(2 * q + 1)
        i, j = q[:, None], q[None, :]
        A = -(R[:, None] * torch.where(i < j, (-1.0) ** (i - j), torch.ones(N, N)) * R[None, :])
        B = R.clone()
    elif measure == "lagt":  # translated Laguerre
        A = torch.eye(N, dtype=torch.float64) / 2 - torch.tril(torch.ones(N, N, dtype=torch.float64))
        B = torch.ones(N, dtype=torch.float64)
    elif measure == "fout":
        # Translated Fourier: the complex system A = diag(2 pi i n) - 1 1^T, B = 1 over frequencies
        # n = 0..N/2-1, written on (real, imaginary) pairs of states.
        if N % 2:
            raise ValueError(f"hippo: measure 'fout' needs an even N, got {N}")
        freqs = torch.arange(N // 2, dtype=torch.float64)
        d = torch.stack([freqs, torch.zeros(N // 2, dtype=torch.float64)], -1).reshape(-1)[:-1]
        A = 2 * math.pi * (torch.diag(d, 1) - torch.diag(d, -1))
        A = A - torch.kron(torch.ones(N // 2, N // 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
        B = (torch.arange(N) % 2 == 0).double()
    else:
        raise ValueError(f"hippo: unknown measure {measure!r}; known: {MEASURES}")
    return A.to(dtype), B.to(dtype)


def discretize(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "gbt", alpha: float = 0.5):
    """(dA (H, N, N), dB (H, N)) for per-feature steps dt (H,), from A (N, N) or (H, N, N) and B (N,) or (H, N).

    gbt: the generalised bilinear transform, dA = (I - alpha dt A)^-1 (I + (1 - alpha) dt A),
         dB = dt (I - alpha dt A)^-1 B (alpha = 0.5: bilinear, 0: forward Euler, 1: backward Euler).
    zoh: zero-order hold, dA = exp(dt A), dB = int_0^dt exp(s A) ds B, both read off the exponential of the
         augmented matrix [[A, B], [0, 0]] dt (no inverse of A needed).
    """
    H, N = dt.shape[0], A.shape[-1]
    A = A.expand(H, N, N)
    B = B.expand(H, N)
    dt_ = dt[:, None, None]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if method == "gbt":
        lhs = eye - alpha * dt_ * A
        dA = torch.linalg.solve(lhs, eye + (1 - alpha) * dt_ * A)
        dB = dt[:, None] * torch.linalg.solve(lhs, B.unsqueeze(-1)).squeeze(-1)
        return dA, dB
    if method == "zoh":
        augmented = torch.zeros(H, N + 1, N + 1, dtype=A.dtype, device=A.device)
        augmented[:, :N, :N] = A
        augmented[:, :N, N] = B
        e = torch.linalg.matrix_exp(augmented * dt_)
        return e[:, :N, :N], e[:, :N, N]
    raise ValueError(f"discretize: unknown method {method!r}; known: 'gbt', 'zoh'")


def krylov_naive(dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K (H, M, L), K[:, :, l] = C dA^l dB, by L mat-vecs: the definition."""
    x = dB
    out = []
    for _ in range(L):
        out.append(torch.einsum("hmn,hn->hm", C, x))
        x = torch.einsum("hnk,hk->hn", dA, x)
    return torch.stack(out, -1)


def krylov_squaring(dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K (H, M, L) the way the reference code computes it: the Krylov tensor [dB, dA dB, dA^2 dB, ...] (H, N, L)
    by doubling (each step multiplies the columns so far by dA^(2^k) and squares it), then C times it."""
    x = dB.unsqueeze(-1)
    power = dA
    while x.shape[-1] < L:
        x = torch.cat([x, power @ x[..., : L - x.shape[-1]]], -1)
        if x.shape[-1] < L:
            power = power @ power
    return C @ x


def circular_kernel(K: torch.Tensor, K_reverse: torch.Tensor | None, L: int) -> torch.Tensor:
    """Both kernels as one circular kernel of length 2L, (H, M, 2L): K[s] at s, K_reverse[s] at 2L - 1 - s (lag
    -(s + 1)), zero elsewhere, so one product of spectra at length 2L gives both directions without wrap-around."""
    kernel = F.pad(K, (0, 2 * L - K.shape[-1]))
    if K_reverse is not None:
        kernel = kernel + F.pad(K_reverse.flip(-1), (2 * L - K_reverse.shape[-1], 0))
    return kernel


def causal_conv(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None, activation: str | None = None,
                K_reverse: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, L, H, M) from u (B, L, H) and a kernel K (H, M, L'), L' <= L zero-extended:

        y[b, t, h, m] = act( sum_{s <= t} K[h, m, s] u[b, t - s, h] + D[h, m] u[b, t, h]
                             + sum_{s < L - 1 - t} K_reverse[h, m, s] u[b, t + 1 + s, h] )

    by FFT at length 2L (no wrap-around); K_reverse (bidirectional layers) reaches strictly into the future.
    """
    Bsz, L, H = u.shape
    uf = torch.fft.rfft(u.transpose(1, 2), n=2 * L)  # (B, H, L + 1)
    kf = torch.fft.rfft(circular_kernel(K, K_reverse, L), n=2 * L)  # (H, M, L + 1)
    y = torch.fft.irfft(uf.unsqueeze(2) * kf, n=2 * L)[..., :L]  # (B, H, M, L)
    y = y.permute(0, 3, 1, 2)  # (B, L, H, M)
    if D is not None:
        y = y + u.unsqueeze(-1) * D
    if activation == "gelu":
        y = F.gelu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv: unknown activation {activation!r}; known: None, 'gelu'")
    return y


def recurrence(u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same system step by step: (y (B, L, H, M), last state (B, H, N)) from u (B, L, H)."""
    Bsz, L, H = u.shape
    x = u.new_zeros(Bsz, H, dA.shape[-1]) if state is None else state
    ys = []
    for t in range(L):
        x = torch.einsum("hnk,bhk->bhn", dA, x) + dB * u[:, t, :, None]
        ys.append(torch.einsum("hmn,bhn->bhm", C, x) + D * u[:, t, :, None])
    return torch.stack(ys, 1), x
