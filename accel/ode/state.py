"""The state of accel.odeint as the user gives it (a tensor of any shape, or a tuple of tensors) and as the solvers
step it: one row (1, N) of all components, or with per-sample control one row per sample (B, N / B)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64)


class State:
    """Flattens ``y0`` for a solver and rebuilds the user's structure from flat rows."""

    def __init__(self, op: str, y0, per_sample: bool):
        self.is_tuple = isinstance(y0, tuple)
        tensors = y0 if self.is_tuple else (y0,)
        if not tensors or not all(isinstance(x, Tensor) for x in tensors):
            raise TypeError(f"{op}: `y0` must be a tensor or a tuple of tensors, got {type(y0).__name__}")
        first = tensors[0]
        if first.dtype not in _FLOATS or any(x.dtype != first.dtype for x in tensors):
            raise TypeError(f"{op}: `y0` must be float32 or float64 (every tensor the same dtype), got "
                            f"{[x.dtype for x in tensors]}")
        if any(x.device != first.device for x in tensors):
            raise ValueError(f"{op}: every tensor of `y0` must be on one device, got {[str(x.device) for x in tensors]}")
        if first.device.type == "meta":  # the solvers read values back (has the step been accepted?)
            raise ValueError(f"{op}: `y0` must hold values, got a tensor on the meta device")
        if per_sample and any(x.dim() == 0 or x.shape[0] != first.shape[0] for x in tensors):
            raise ValueError(f"{op}: with per_sample=True every tensor of `y0` must have the batch as its first "
                             f"dimension, got shapes {[tuple(x.shape) for x in tensors]}")
        self.shapes = [x.shape for x in tensors]
        self.dtype, self.device = first.dtype, first.device
        self.rows = first.shape[0] if per_sample else 1
        self.sizes = [math.prod(x.shape[1:]) if per_sample else x.numel() for x in tensors]
        if per_sample and sum(self.sizes) == 0:  # the error norm would be a mean over no components
            raise ValueError(f"{op}: `y0` must have at least one state component per sample, got shapes "
                             f"{[tuple(s) for s in self.shapes]}")
        self.flat = self.flatten(tensors)

    def flatten(self, tensors) -> Tensor:
        """(rows, N) from a tensor or tuple shaped like y0."""
        if not self.is_tuple or len(self.shapes) == 1:
            return tensors[0].reshape(self.rows, self.sizes[0])
        return torch.cat([x.reshape(self.rows, n) for x, n in zip(tensors, self.sizes)], 1)

    def flatten_derivative(self, op: str, value) -> Tensor:
        """func's return value, checked against y0's structure, as (rows, N)."""
        tensors = value if self.is_tuple else (value,)
        if (not isinstance(tensors, tuple) or len(tensors) != len(self.shapes)
                or not all(isinstance(x, Tensor) and x.shape == s for x, s in zip(tensors, self.shapes))):
            got = (tuple(tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in tensors)
                   if isinstance(tensors, tuple) else type(value).__name__)
            raise ValueError(f"{op}: `func` must return dy/dt shaped like y0 {self.describe()}, got {got}")
        return self.flatten(tensors)

    def unflatten(self, flat: Tensor, lead: tuple = ()):
        """The user's structure from (*lead, rows, N)."""
        parts = flat.split(self.sizes, -1) if self.is_tuple else (flat,)
        shaped = tuple(p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes))
        return shaped if self.is_tuple else shaped[0]

    def describe(self) -> str:
        shapes = [tuple(s) for s in self.shapes]
        return str(tuple(shapes)) if self.is_tuple else str(shapes[0])

    def mixed_norm(self):
        """torchdiffeq's norm of a tuple state: the largest RMS over its tensors; None (the RMS over the whole
        state, fused) for a tensor."""
        if not self.is_tuple:
            return None
        sizes = self.sizes

        def norm(x: Tensor) -> Tensor:
            return torch.stack([p.pow(2).mean().sqrt() if p.numel() else p.new_zeros(())
                                for p in x.split(sizes, -1)]).max()
        return norm

    def user_norm(self, norm):
        """A norm the user wrote for their own structure, as a norm of flat rows."""
        return lambda x: norm(self.unflatten(x))
