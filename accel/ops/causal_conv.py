"""accel.ops.causal_conv: the LSSL's long convolution y = act(K * u + D u), by FFT, with the skip and the
activation fused into the output pass.

Flow: causal_conv (checks) -> torch.ops.accel.causal_conv -> C++ kernel on the CPU (csrc/cpu/causal_conv.cpp:
FFTs of length 2L with features in blocks, so the spectra in flight are those of one block; up to L = 128
with one channel, the direct sum over lags, which is faster there), cuFFT with Triton passes around it on
CUDA (kernels/causal_conv.py), the reference elsewhere. The backward
is the op accel::causal_conv_backward, which recomputes the pre-activation instead of saving it.
"""
import torch
from torch import Tensor

from accel.ops._library import lib, register_backends, triton_kernel
from accel.reference import lssl as reference

lib.define("causal_conv(Tensor u, Tensor K, Tensor? D, str? activation, Tensor? K_reverse) -> Tensor")
lib.define("causal_conv_backward(Tensor grad, Tensor u, Tensor K, Tensor? D, str? activation, Tensor? K_reverse) "
           "-> (Tensor, Tensor, Tensor, Tensor)")

ACTIVATIONS = (None, "gelu")


def causal_conv(u: Tensor, K: Tensor, D: Tensor | None = None, activation: str | None = None,
                K_reverse: Tensor | None = None) -> Tensor:
    """y (B, L, H, M) with ``y[b, t, h, m] = act(sum_{s <= t} K[h, m, s] u[b, t - s, h] + D[h, m] u[b, t, h]
    + sum_s K_reverse[h, m, s] u[b, t + 1 + s, h])``.

    Args:
        u: (B, L, H) input, batch-first, float32 or float64.
        K: (H, M, Lk) kernel, Lk <= L (zero beyond).
        D: (H, M) skip weights, or None.
        activation: None or 'gelu' (exact, erf).
        K_reverse: (H, M, Lk') kernel reaching strictly into the future (bidirectional layers), or None.
    """
    for name, t, dim in (("u", u, 3), ("K", K, 3), ("D", D, 2), ("K_reverse", K_reverse, 3)):
        if t is None and name in ("D", "K_reverse"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"causal_conv: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"causal_conv: `{name}` must have {dim} dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64) or t.dtype != u.dtype or t.device != u.device:
            raise TypeError(f"causal_conv: `{name}` must be float32 or float64 like `u` and on its device, got "
                            f"{t.dtype} on {t.device}")
    B, L, H = u.shape
    if K.shape[0] != H or K.shape[2] > L or (K.shape[2] == 0 and L > 0):
        raise ValueError(f"causal_conv: `K` must have shape (H, M, Lk) = ({H}, M, 1 <= Lk <= {L}), got "
                         f"{tuple(K.shape)}")
    if D is not None and D.shape != K.shape[:2]:
        raise ValueError(f"causal_conv: `D` must have shape (H, M) = {tuple(K.shape[:2])}, got {tuple(D.shape)}")
    if K_reverse is not None and (K_reverse.shape[:2] != K.shape[:2] or K_reverse.shape[2] > L
                                  or (K_reverse.shape[2] == 0 and L > 0)):
        raise ValueError(f"causal_conv: `K_reverse` must have shape ({H}, {K.shape[1]}, 1 <= Lk' <= {L}), got "
                         f"{tuple(K_reverse.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    return torch.ops.accel.causal_conv(u, K, D, activation, K_reverse)


@torch.library.register_fake("accel::causal_conv")
def _fake(u, K, D, activation, K_reverse):
    return u.new_empty(*u.shape, K.shape[1])


@torch.library.register_fake("accel::causal_conv_backward")
def _backward_fake(grad, u, K, D, activation, K_reverse):
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(K, memory_format=torch.contiguous_format),
            torch.empty_like(D, memory_format=torch.contiguous_format) if D is not None else u.new_empty(0),
            torch.empty_like(K_reverse, memory_format=torch.contiguous_format) if K_reverse is not None
            else u.new_empty(0))


def _setup_context(ctx, inputs, output):
    u, K, D, activation, K_reverse = inputs
    ctx.save_for_backward(u, K, D, K_reverse)
    ctx.activation = activation


def _backward(ctx, grad):
    u, K, D, K_reverse = ctx.saved_tensors
    gu, gK, gD, gKr = torch.ops.accel.causal_conv_backward(grad, u, K, D, ctx.activation, K_reverse)
    return gu, gK, gD if D is not None else None, None, gKr if K_reverse is not None else None


torch.library.register_autograd("accel::causal_conv", _backward, setup_context=_setup_context)


def _reference_forward(u, K, D, activation, K_reverse):
    with torch.no_grad():
        return reference.causal_conv(u, K, D, activation, K_reverse).contiguous()


def _reference_backward(grad, u, K, D, activation, K_reverse):
    with torch.enable_grad():
        given = [t for t in (u, K, D, K_reverse) if t is not None]
        leaves = [t.detach().requires_grad_() for t in given]
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in (u, K, D, K_reverse)]
        y = reference.causal_conv(args[0], args[1], args[2], activation, args[3])
        grads = iter(torch.autograd.grad(y, leaves, grad))
        return tuple(next(grads).contiguous() if t is not None else u.new_empty(0) for t in (u, K, D, K_reverse))


register_backends("causal_conv", _reference_forward, triton_kernel("causal_conv", "forward"))
register_backends("causal_conv_backward", _reference_backward, triton_kernel("causal_conv", "backward"))
