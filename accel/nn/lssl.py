"""accel.nn.LSSL: a Linear State-Space Layer (Gu et al., 2021) on accel.ops.krylov_kernel and causal_conv.

Each of the H features runs the system x' = A x + B u, y = C x + D u (N states, M output channels), with A and
B shared by the features and initialised from a HiPPO measure, and a step dt per feature learned in log space.
In training and for whole sequences the layer runs as a convolution: the Krylov kernel K_l = C dA^l dB (never
the (H, N, L) Krylov tensor), then y = gelu(K * u + D u) by FFT, dropout, and a linear map from the H * M
channels back to H. For inference ``step`` runs the same system one time step at a time.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from accel.ops import causal_conv, krylov_kernel
from accel.ops._checks import check_count, is_real
from accel.reference.lssl import MEASURES, discretize, hippo


class LSSL(nn.Module):
    """Batch-first (B, L, H) -> (B, L, H).

    Args:
        d_model: H, the features.
        d_state: N, the states per feature.
        channels: M, the output channels per feature (mixed back to H by the output linear map).
        measure: HiPPO initialisation of A and B: 'legs', 'legt', 'lagt' or 'fout'.
        dt_min, dt_max: the range the per-feature steps are drawn from (log-uniformly).
        learn_dt: whether log dt is a Parameter (else a buffer).
        bidirectional: also run the system backwards in time with its own C (the kernel reaches into the
            future; ``step`` is then unavailable).
        dropout: dropout after the activation.
        discretization: 'gbt' (generalised bilinear transform with ``alpha``; 0.5 is the bilinear one) or
            'zoh' (zero-order hold).
    """

    def __init__(self, d_model: int, d_state: int, channels: int = 1, measure: str = "legs", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, learn_dt: bool = True, bidirectional: bool = False, dropout: float = 0.0,
                 discretization: str = "gbt", alpha: float = 0.5):
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"LSSL: `measure` must be one of {MEASURES}, got {measure!r}")
        if discretization not in ("gbt", "zoh"):
            raise ValueError(f"LSSL: `discretization` must be 'gbt' or 'zoh', got {discretization!r}")
        for name, value in (("d_model", d_model), ("d_state", d_state), ("channels", channels)):
            check_count("LSSL", name, value)
        if not (is_real(dt_min) and dt_min > 0):
            raise ValueError(f"LSSL: `dt_min` must be a finite number > 0, got {dt_min!r}")
        if not (is_real(dt_max) and dt_max >= dt_min):
            raise ValueError(f"LSSL: `dt_max` must be a finite number >= `dt_min` ({dt_min}), got {dt_max!r}")
        if not (is_real(dropout) and 0 <= dropout <= 1):
            raise ValueError(f"LSSL: `dropout` must be in [0, 1], got {dropout!r}")
        if discretization == "gbt" and not (is_real(alpha) and 0 <= alpha <= 1):
            raise ValueError(f"LSSL: `alpha` of the generalised bilinear transform must be in [0, 1], got {alpha!r}")
        self.d_model, self.d_state, self.channels = d_model, d_state, channels
        self.bidirectional = bidirectional
        self.discretization, self.alpha = discretization, alpha
        A, B = hippo(measure, d_state, dtype=torch.float32)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        directions = 2 if bidirectional else 1
        self.C = nn.Parameter(torch.randn(d_model, directions * channels, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model, channels))
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        if learn_dt:
            self.log_dt = nn.Parameter(log_dt)
        else:
            self.register_buffer("log_dt", log_dt)
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(d_model * channels, d_model)

    def discrete_system(self):
        """(dA (H, N, N), dB (H, N)) at the current steps."""
        return discretize(self.A, self.B, self.log_dt.exp(), self.discretization, self.alpha)

    def kernel(self, L: int):
        """(K (H, M, L), K_reverse (H, M, L) or None): the convolution kernels of the current system."""
        dA, dB = self.discrete_system()
        K = krylov_kernel(dA, dB, self.C, L)
        if not self.bidirectional:
            return K, None
        return K[:, : self.channels], K[:, self.channels:]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.dim() != 3 or u.shape[-1] != self.d_model or u.shape[1] == 0:
            raise ValueError(f"LSSL: `u` must have shape (B, L, {self.d_model}) with L >= 1, got {tuple(u.shape)}")
        K, K_reverse = self.kernel(u.shape[1])
        y = causal_conv(u, K, self.D, "gelu", K_reverse)  # (B, L, H, M)
        y = self.dropout(y)
        return self.output_linear(y.flatten(2))

    def default_state(self, batch: int) -> torch.Tensor:
        """The zero state (batch, H, N) that ``step`` starts from."""
        return self.C.new_zeros(batch, self.d_model, self.d_state)

    def step(self, u_t: torch.Tensor, state: torch.Tensor):
        """One time step of the recurrence: u_t (B, H), state (B, H, N) -> (y_t (B, H), next state). Running it
        over a sequence from ``default_state`` gives ``forward``'s output (in eval mode: no dropout)."""
        if self.bidirectional:
            raise RuntimeError("LSSL.step: a bidirectional layer sees the future; it has no recurrent mode")
        if u_t.dim() != 2 or u_t.shape[1] != self.d_model:
            raise ValueError(f"LSSL.step: `u_t` must have shape (B, {self.d_model}), got {tuple(u_t.shape)}")
        if state.shape != (u_t.shape[0], self.d_model, self.d_state):
            raise ValueError(f"LSSL.step: `state` must have shape ({u_t.shape[0]}, {self.d_model}, {self.d_state}), "
                             f"got {tuple(state.shape)}")
        dA, dB = self.discrete_system()
        state = torch.einsum("hnk,bhk->bhn", dA, state) + dB * u_t[..., None]
        y = torch.einsum("hmn,bhn->bhm", self.C, state) + self.D * u_t[..., None]
        y = self.dropout(F.gelu(y))
        return self.output_linear(y.flatten(1)), state
