"""accel.ops.hopfield_update: the Hopfield layers' update steps and final retrieval (accel/reference/hopfield.py)
without keeping any L x S association for autograd.

Flow: hopfield_update (checks, masks) -> torch.ops.accel.hopfield_update, which returns with the output what
the backward needs: the state pattern q_t of every step and its softmax's row statistics, the maximum and 1/sum
(O(steps L d), not O(steps L S); their log-sum-exps max - log(1/sum) also give the energy trace), and how many
updates each row took. The backward is the op accel::hopfield_update_backward: it rebuilds each step's
association from them, P = exp(beta q_t k^T + mask - max) normalised by its own row sum, and runs the steps
backwards. The recomputed logits need not round as the forward's did (a product of the same operands may round
otherwise the second time), so neither the forward's 1/sum nor its log-sum-exp normalises them: with either,
a sharp row's largest weight carries the logits' whole rounding error, which grows with |logits|. Both run over blocks of whole rows, so at most one block's L x S logits exist at a time.
The kernels: on the CPU, C++ (csrc/cpu/hopfield_update.cpp: one task per head, blocks of rows whose logits stay
in cache); on CUDA, Triton (kernels/hopfield_update.py) where it covers the call: a forward that runs all steps
in registers with an online softmax, and a FlashAttention-2 style backward, per step one kernel over blocks of
rows for dq and one over blocks of stored patterns for dk and dv; elsewhere the PyTorch kernels below: matrix
products and one softmax per step.
"""
import math

import torch
from torch import Tensor

from accel.ops._library import lib, triton_available, triton_kernel
from accel.ops.hopfield_energy import energy_from_lse

lib.define("hopfield_update(Tensor q, Tensor k, Tensor v, Tensor beta, int steps, Tensor? mask, float? eps, "
           "bool return_association) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
lib.define("hopfield_update_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? mask, "
           "Tensor saved_q, Tensor stats, Tensor taken) -> (Tensor, Tensor, Tensor, Tensor)")

SUPPORTED_DTYPES = (torch.float32, torch.float64)
_BLOCK_ELEMENTS = 1 << 24  # logits of one block of rows: at most this many values (64 MiB in float32)


def hopfield_update(q: Tensor, k: Tensor, v: Tensor, beta: float | Tensor, steps: int = 1, *,
                    mask: Tensor | None = None, key_padding_mask: Tensor | None = None, eps: float | None = None,
                    return_association: bool = False, return_energy: bool = False):
    """``steps`` Hopfield updates q <- softmax(beta q k^T) k, then the retrieval softmax(beta q k^T) v.

    Args:
        q: (B, H, L, d) state patterns (queries), float32 or float64.
        k: (B, H, S, d) or (1, H, S, d) stored patterns (keys); batch 1 is shared by the whole batch, uncopied.
        v: (B, H, S, dv) or (1, H, S, dv) values.
        beta: the inverse temperature: a number, or a 0-dim tensor (learnable: it gets a gradient).
        steps: update steps before the retrieval, >= 0 (0: one retrieval, i.e. attention with scale beta).
        mask: the association mask, broadcasting to (B, H, L, S): bool (True: the pair is not associated)
            or float (added to the logits). It gets no gradient.
        key_padding_mask: (B, S) bool, True where a stored pattern is padding.
        eps: the per-row stopping rule: a row stops updating once an update changed its association by
            less than eps (Euclidean norm over the S weights); None updates every row ``steps`` times.
            (hflayers stops a whole head once its association matrix changes by less than eps, which needs
            a host sync per step; here the rows of a head stop independently, and nothing syncs.)
        return_association: also return the final association (B, H, L, S) (not differentiable).
        return_energy: also return the energy E(q_t) of every state pattern at every step, (steps + 1, B, H, L),
            read off the saved log-sum-exps (no extra pass; for monitoring, not differentiable). With
            key_padding_mask, N and M count the stored patterns that are not padding; not defined with `mask`.

    Returns out (B, H, L, dv), followed by the association and the energies when asked for.
    """
    op = "hopfield_update"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: `{name}` must have 4 dimensions (B, H, rows, width), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES or t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` must be float32 or float64 like `q`, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `q` is on {q.device}")
    B, H, L, d = q.shape
    S = k.shape[2]
    if k.shape[0] not in (1, B) or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(f"{op}: `k` must have shape ({B} or 1, {H}, S, {d}), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: `v` must have shape ({k.shape[0]}, {H}, {S}, dv) like `k`, got {tuple(v.shape)}")
    if S == 0:
        raise ValueError(f"{op}: `k` must hold at least one stored pattern, got shape {tuple(k.shape)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{op}: `steps` must be an int >= 0, got {steps!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0 or None, got {eps!r}")
    if isinstance(beta, Tensor):
        if beta.numel() != 1:
            raise ValueError(f"{op}: `beta` must be a number or a one-element tensor, got shape {tuple(beta.shape)}")
        if beta.device != q.device and beta.device.type != "cpu":  # a CPU scalar is read as a number anywhere
            raise ValueError(f"{op}: `beta` is on {beta.device} but `q` is on {q.device}")
        beta = beta.reshape(())
    elif isinstance(beta, (int, float)) and math.isfinite(beta):
        beta = torch.tensor(float(beta), dtype=q.dtype, device=q.device)
    else:
        raise ValueError(f"{op}: `beta` must be a finite number or a tensor, got {beta!r}")
    if return_energy and mask is not None:
        raise ValueError(f"{op}: `return_energy` is defined for all stored patterns or key padding, not with `mask`")
    additive = _additive_mask(op, mask, key_padding_mask, (B, H, L, S), q)
    out, association, saved_q, stats, _ = torch.ops.accel.hopfield_update(q, k, v, beta.to(q.dtype), steps, additive,
                                                                        None if eps is None else float(eps),
                                                                        return_association)
    results = [out]
    if return_association:
        results.append(association)
    if return_energy:
        results.append(_energies(saved_q.detach(), stats.detach(), k.detach(), beta.detach(), key_padding_mask))
    return tuple(results) if len(results) > 1 else out


def _energies(saved_q, stats, k, beta, key_padding_mask):
    """E(q_t) per row and step from the saved row statistics' log-sum-exps (accel.ops.hopfield_energy's formula)."""
    lse = stats[..., 0] - torch.log(stats[..., 1])
    norms = k.norm(dim=-1)  # (B or 1, H, S)
    count = torch.full(norms.shape[:2], float(k.shape[2]), dtype=k.dtype, device=k.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.to(k.device)[:, None, :]
        norms = torch.where(keep, norms, 0.0)
        count = keep.sum(-1).to(k.dtype).expand(-1, k.shape[1])
    return energy_from_lse(lse, saved_q, norms, count, beta)


def _additive_mask(op, mask, key_padding_mask, shape, q):
    B, H, L, S = shape
    total = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool or \
                key_padding_mask.shape != (B, S):
            raise ValueError(f"{op}: `key_padding_mask` must be a bool tensor of shape ({B}, {S})")
        _check_copyable(op, "key_padding_mask", key_padding_mask, q)
        total = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill(
            key_padding_mask[:, None, None, :].to(q.device), -math.inf)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() > 4:
            raise ValueError(f"{op}: `mask` must be a tensor broadcasting to (B, H, L, S) = {shape}")
        try:
            torch.broadcast_shapes(mask.shape, shape)
        except RuntimeError:
            raise ValueError(f"{op}: `mask` of shape {tuple(mask.shape)} does not broadcast to (B, H, L, S) = "
                             f"{shape}") from None
        _check_copyable(op, "mask", mask, q)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask.to(q.device), -math.inf)
        elif mask.dtype.is_floating_point:
            mask = mask.to(q.device, q.dtype)
        else:
            raise TypeError(f"{op}: `mask` must be bool or floating point, got {mask.dtype}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        total = mask if total is None else total + mask
    return total


def _check_copyable(op, name, mask, q):
    """Masks on another device are copied to q's; a meta tensor has no values to copy."""
    if mask.device != q.device and mask.device.type == "meta":
        raise ValueError(f"{op}: `{name}` is on {mask.device} but `q` is on {q.device}")


def _row_blocks(B, H, L, S):
    rows = max(1, _BLOCK_ELEMENTS // max(1, B * H * S))
    return [slice(r, min(L, r + rows)) for r in range(0, L, rows)]


def _mask_rows(mask, rows):
    if mask is None:
        return None
    return mask[:, :, rows] if mask.shape[2] != 1 else mask


def _logits(qt, kt, beta, m):
    logits = (beta * qt) @ kt  # beta scales the L x d side, not the L x S one
    return logits if m is None else logits + m


def _forward(q, k, v, beta, steps, mask, eps, return_association):
    B, H, L, d = q.shape
    S = k.shape[2]
    saved_q = q.new_empty(steps + 1, B, H, L, d)
    stats = q.new_empty(steps + 1, B, H, L, 2)
    taken = torch.zeros(B, H, L, dtype=torch.long, device=q.device)
    out = q.new_empty(B, H, L, v.shape[3])
    association = q.new_empty(B, H, L, S) if return_association else q.new_empty(0)
    kt = k.transpose(-1, -2)
    for rows in _row_blocks(B, H, L, S):
        m = _mask_rows(mask, rows)
        qt = q[:, :, rows]
        active = torch.ones(qt.shape[:-1], dtype=torch.bool, device=q.device)
        previous = None
        for t in range(steps + 1):
            saved_q[t, :, :, rows] = qt
            logits = _logits(qt, kt, beta, m)
            p = torch.softmax(logits, dim=-1)
            stats[t, :, :, rows, 0] = logits.amax(-1)
            stats[t, :, :, rows, 1] = p.amax(-1)  # P at the maximum is e^0 / sum
            if t == steps:
                out[:, :, rows] = p @ v
                if return_association:
                    association[:, :, rows] = p
                break
            if eps is not None:
                if previous is not None:  # the row's last update changed its association by less than eps
                    active &= (p - previous).norm(dim=-1) >= eps
                previous = p
            qt = torch.where(active.unsqueeze(-1), p @ k, qt)
            taken[:, :, rows] += active
    return out, association, saved_q, stats, taken


def _backward(grad, q, k, v, beta, mask, saved_q, stats, taken):
    steps = saved_q.shape[0] - 1
    B, H, L, d = q.shape
    S = k.shape[2]
    grad_q = q.new_empty(q.shape)  # contiguous, like every output here and in the fake kernels
    grad_k = k.new_zeros(B, H, S, d)
    grad_v = v.new_zeros(B, H, S, v.shape[3])
    grad_beta = torch.zeros((), dtype=torch.float64, device=q.device)
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)

    def softmax_backward(p, dp):
        """dS = P (dP - rowsum(dP P)), in place in dP."""
        return dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)

    for rows in _row_blocks(B, H, L, S):
        m = _mask_rows(mask, rows)

        def logits_backward(t, ds):
            """What dS (the logits' gradient) gives beta and k; returns it as q_t's gradient. With
            logits = beta q k^T + m: d beta = sum dS q k^T = sum_rows q . (dS k)."""
            nonlocal grad_beta
            q_t = saved_q[t, :, :, rows]
            ds_k = ds @ k
            grad_beta = grad_beta + (q_t * ds_k).sum(dtype=torch.float64)
            grad_k.add_(ds.transpose(-1, -2) @ (beta * q_t))
            return beta * ds_k

        def association(t):
            """P of step t, rebuilt from q_t, shifted by its row maximum and normalised by its own sum."""
            e = torch.exp(_logits(saved_q[t, :, :, rows], kt, beta, m) - stats[t, :, :, rows, 0:1])
            return e / e.sum(-1, keepdim=True)

        # the retrieval out = P_T V
        g = grad[:, :, rows]
        p = association(steps)
        grad_v.add_(p.transpose(-1, -2) @ g)
        dq = logits_backward(steps, softmax_backward(p, g @ vt))
        for t in range(steps - 1, -1, -1):
            # q_{t+1} = P_t k for the rows still updating at step t; the rows that had stopped carry dq through
            active = (taken[:, :, rows] > t).unsqueeze(-1)
            dq_next = torch.where(active, dq, 0.0)
            p = association(t)
            grad_k.add_(p.transpose(-1, -2) @ dq_next)
            dq = torch.where(active, logits_backward(t, softmax_backward(p, dq_next @ kt)), dq)
        grad_q[:, :, rows] = dq
    if k.shape[0] == 1 and B != 1:  # stored patterns shared by the batch
        grad_k, grad_v = grad_k.sum(0, keepdim=True), grad_v.sum(0, keepdim=True)
    return grad_q, grad_k, grad_v, grad_beta.to(beta.dtype)


def _forward_kernel(q, k, v, beta, steps, mask, eps, return_association):
    with torch.no_grad():
        return _forward(q, k, v, beta, steps, mask, eps, return_association)


def _backward_kernel(grad, q, k, v, beta, mask, saved_q, stats, taken):
    with torch.no_grad():
        return _backward(grad.contiguous(), q, k, v, beta, mask, saved_q, stats, taken)


_triton_supports = triton_kernel("hopfield_update", "supports")
_triton_forward = triton_kernel("hopfield_update", "forward")
_triton_supports_backward = triton_kernel("hopfield_update", "supports_backward")
_triton_backward = triton_kernel("hopfield_update", "backward")


def _cuda_forward_kernel(q, k, v, beta, steps, mask, eps, return_association):
    """The Triton forward where it covers the call (kernels/hopfield_update.py), else the PyTorch one."""
    if not _triton_supports(q, eps, return_association):
        return _forward_kernel(q, k, v, beta, steps, mask, eps, return_association)
    out, saved_q, stats = _triton_forward(q, k, v, beta, steps, mask)
    taken = torch.full(q.shape[:3], steps, dtype=torch.long, device=q.device)  # no stopping rule: every step
    return out, q.new_empty(0), saved_q, stats, taken


def _cuda_backward_kernel(grad, q, k, v, beta, mask, saved_q, stats, taken):
    """The Triton backward where it covers the call (kernels/hopfield_update.py), else the PyTorch one."""
    if not _triton_supports_backward(q):
        return _backward_kernel(grad, q, k, v, beta, mask, saved_q, stats, taken)
    return _triton_backward(grad, q, k, v, beta, mask, saved_q, stats, taken)


lib.impl("hopfield_update", _forward_kernel, "CompositeExplicitAutograd")
lib.impl("hopfield_update_backward", _backward_kernel, "CompositeExplicitAutograd")
if triton_available():
    lib.impl("hopfield_update", _cuda_forward_kernel, "CUDA")
    lib.impl("hopfield_update_backward", _cuda_backward_kernel, "CUDA")


@torch.library.register_fake("accel::hopfield_update")
def _fake(q, k, v, beta, steps, mask, eps, return_association):
    B, H, L, d = q.shape
    S = k.shape[2]
    association = q.new_empty(B, H, L, S) if return_association else q.new_empty(0)
    return (q.new_empty(B, H, L, v.shape[3]), association, q.new_empty(steps + 1, B, H, L, d),
            q.new_empty(steps + 1, B, H, L, 2),
            q.new_empty(B, H, L, dtype=torch.long))


@torch.library.register_fake("accel::hopfield_update_backward")
def _backward_fake(grad, q, k, v, beta, mask, saved_q, stats, taken):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, beta, steps, mask, eps, return_association = inputs
    _, association, saved_q, stats, taken = output
    ctx.mark_non_differentiable(association, saved_q, stats, taken)
    ctx.save_for_backward(q, k, v, beta, mask, saved_q, stats, taken)


def _autograd_backward(ctx, grad, *unused):
    q, k, v, beta, mask, saved_q, stats, taken = ctx.saved_tensors
    gq, gk, gv, gbeta = torch.ops.accel.hopfield_update_backward(grad, q, k, v, beta, mask, saved_q, stats, taken)
    return gq, gk, gv, gbeta, None, None, None, None


torch.library.register_autograd("accel::hopfield_update", _autograd_backward, setup_context=_setup_context)
