"""DARTS mixed operation (Liu et al., 2019, eq. 2), written as plainly as the paper.

An edge (i, j) of the search cell mixes the outputs y_1..y_K of its K candidate operations:

    out = sum_k w_k * y_k,      w = softmax(alpha / tau)   (or w given directly)

A weight that is exactly zero switches its branch off: the branch adds nothing and gets no
gradient (its y is never read by the fast kernels). This is how pruned or unsampled branches
(GDAS, ProxylessNAS, DARTS-PT) are expressed.
"""
import torch


def mixing_weights(weights: torch.Tensor, tau: float | None) -> torch.Tensor:
    """w = softmax(alpha / tau) when a temperature is given, else the weights as they are."""
    if tau is None:
        return weights
    return torch.softmax(weights / tau, dim=0)


def mixed_op(ys, weights: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """out = sum_k w_k * y_k for the K same-shaped tensors in ``ys``."""
    w = mixing_weights(weights, tau)
    # Exactly-zero weights are switched off: detaching them leaves the value (0) and stops the gradient.
    w = torch.where(w == 0, w.detach(), w)
    out = w[0] * ys[0]
    for k in range(1, len(ys)):
        out = out + w[k] * ys[k]
    return out
