"""Modern Hopfield networks ("Hopfield Networks is All You Need", Ramsauer et al., 2020), written as plainly as
the paper: the update, the retrieval, and the energy it decreases.

Stored patterns X = (x_1 .. x_N) (the keys), a state pattern xi (a query) and an inverse temperature beta:

    E(xi)  = -1/beta logsumexp(beta X^T xi) + 1/2 xi^T xi + 1/beta log N + 1/2 M^2,   M = max_i ||x_i||
    xi_new = X softmax(beta X^T xi)

The update is the concave-convex procedure on E, so E never increases along it; with well-separated
patterns one update retrieves the stored pattern nearest to xi. The Hopfield layers (hflayers) batch this
over B x heads with L state patterns per head, run the update for a number of steps with the keys as the
stored patterns, and finish with one retrieval against the values V:

    p_t     = softmax(beta q_t K^T)            (the association of each state pattern, a row of S weights)
    q_{t+1} = p_t K                            for t < steps
    out     = p_steps V

This reference builds the L x S association at every step, as the layers' code does.
"""
import math

import torch


def association(q: torch.Tensor, k: torch.Tensor, beta, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(beta q k^T + mask) over the stored patterns: (..., L, S). ``mask`` is additive (-inf removes a
    stored pattern) and broadcasts against (..., L, S)."""
    logits = beta * q @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask
    return torch.softmax(logits, dim=-1)


def additive_mask(key_padding_mask: torch.Tensor | None = None, association_mask: torch.Tensor | None = None,
                  dtype=torch.float64) -> torch.Tensor | None:
    """One additive mask from the layers' two kinds (nn.MultiheadAttention's conventions):

    key_padding_mask: (B, S) bool, True where a stored pattern is padding; it becomes (B, 1, 1, S).
    association_mask: (L, S) or broadcastable to (B, heads, L, S); bool (True: the pair is not associated)
        or float (added to the logits).
    """
    mask = None
    if key_padding_mask is not None:
        mask = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        mask = mask.masked_fill(key_padding_mask, -math.inf)[:, None, None, :]
    if association_mask is not None:
        if association_mask.dtype == torch.bool:
            extra = torch.zeros(association_mask.shape, dtype=dtype, device=association_mask.device)
            extra = extra.masked_fill(association_mask, -math.inf)
        else:
            extra = association_mask.to(dtype)
        mask = extra if mask is None else mask + extra
    return mask


def hopfield_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta, steps: int,
                    mask: torch.Tensor | None = None, eps: float | None = None):
    """The layers' update and retrieval: returns (out (..., L, dv), p (..., L, S), steps_taken (..., L)).

    q: (..., L, d) state patterns; k: (..., S, d) stored patterns; v: (..., S, dv) values (the leading dims
    broadcast, so stored patterns may be shared across a batch); beta: a number or a tensor broadcasting
    against (..., 1, 1); steps >= 0 updates; mask: additive, broadcasting against (..., L, S).

    eps: the per-row stopping rule. After each update of a row, if its association changed by less than eps
    (the Euclidean norm of p_{t+1} - p_t over the S weights), the row stops there: its state pattern and
    association are frozen for the remaining steps. None runs every row for all steps.
    steps_taken counts the updates each row made.
    """
    if steps < 0:
        raise ValueError(f"hopfield_update: `steps` must be >= 0, got {steps}")
    p = association(q, k, beta, mask)
    active = torch.ones(p.shape[:-1], dtype=torch.bool, device=q.device)
    taken = torch.zeros(p.shape[:-1], dtype=torch.long, device=q.device)
    for _ in range(steps):
        q_next = p @ k
        p_next = association(q_next, k, beta, mask)
        row = active.unsqueeze(-1)
        q = torch.where(row, q_next, q)
        taken = taken + active.long()
        if eps is not None:
            converged = (p_next - p).norm(dim=-1) < eps
            p = torch.where(row, p_next, p)
            active = active & ~converged
        else:
            p = p_next
    return p @ v, p, taken


def association_per_head(q: torch.Tensor, k: torch.Tensor, scale, steps_max: torch.Tensor,
                         eps: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         per_row: bool = False, rounds: int | None = None, return_updates: bool = False):
    """hflayers' update loop with its stopping rule: the association (B, H, L, S) after the updates.

    q: (B, H, L, d) state patterns and k: (B or 1, H, S, d) stored patterns; scale: beta, a number or a tensor
    broadcasting against q (hflayers multiplies the state patterns by it, feature by feature); steps_max: (H,)
    the updates each head may make (< 0: no bound); eps: (H,) thresholds, or None for no stopping rule;
    mask: additive, broadcasting against (B, H, L, S).

    After each update, head h goes on while it has updates left and some sample's association changed by more
    than eps[h] (the Frobenius norm over L x S, largest over the batch). With per_row, each row goes on while its
    own association changed by at least eps[h] (the Euclidean norm over S), the rule of hopfield_update above.
    What stopped keeps its association. The loop reads the rule back every step (a host sync), as hflayers;
    rounds (the largest of steps_max, when all are bounded) caps it, so that a compiled graph runs that many
    masked updates instead and never reads it back. return_updates: also the updates each row made, (B, H, L)."""
    def associate(state):
        logits = (state * scale) @ k.transpose(-1, -2)
        return torch.softmax(logits if mask is None else logits + mask, dim=-1)

    p = associate(q)
    bound = steps_max.view(1, -1, 1, 1)
    taken = 0
    active = ((bound > taken) | (bound < 0)).expand(*p.shape[:3], 1)
    updates = torch.zeros(p.shape[:3], dtype=torch.long, device=p.device)
    while rounds is None or taken < rounds:
        if not torch.compiler.is_compiling() and not bool(active.any()):
            break
        previous = p
        p = torch.where(active, associate(p @ k), p)
        updates = updates + active[..., 0]
        taken += 1
        with torch.no_grad():
            going = (bound > taken) | (bound < 0)
            if eps is not None:
                change = p - previous
                threshold = eps.view(1, -1, 1, 1)
                if per_row:
                    going = going & (change.norm(dim=-1, keepdim=True) >= threshold)
                else:
                    going = going & (change.norm(dim=(2, 3)).amax(dim=0).view(1, -1, 1, 1) > threshold)
            active = active & going
    return (p, updates) if return_updates else p


def hopfield_energy(xi: torch.Tensor, X: torch.Tensor, beta) -> torch.Tensor:
    """E(xi) for state patterns xi (..., L, d) against stored patterns X (..., N, d): (..., L)."""
    N = X.shape[-2]
    M = X.norm(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1)
    lse = torch.logsumexp(beta * xi @ X.transpose(-1, -2), dim=-1)
    return -lse / beta + 0.5 * (xi * xi).sum(-1) + math.log(N) / beta + 0.5 * M * M


def energy_trace(q: torch.Tensor, k: torch.Tensor, beta, steps: int) -> torch.Tensor:
    """E(q_t) for t = 0 .. steps along the update (no mask, no stopping): (steps + 1, ..., L)."""
    energies = [hopfield_energy(q, k, beta)]
    for _ in range(steps):
        q = association(q, k, beta) @ k
        energies.append(hopfield_energy(q, k, beta))
    return torch.stack(energies)
