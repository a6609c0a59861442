"""Hopfield layers (Ramsauer et al., 2020) with the options people use from hflayers, on
accel.ops.hopfield_update.

* `Hopfield`: state patterns (queries) associated with stored patterns (keys), retrieving pattern projections
  (values): LayerNorm of each input, linear maps into num_heads heads of the Hopfield space, update_steps_max
  update steps with the per-row stopping rule update_steps_eps, the retrieval and an output map.
* `HopfieldPooling`: a learned state pattern (``quantity`` of them) pools the input's patterns.
* `HopfieldLayer`: the input's patterns are the state patterns; stored patterns and their projections are a
  learned lookup table of ``quantity`` entries, shared by the whole batch (never copied per sample).

Inputs are (batch, length, features) with batch_first=True (the default), else (length, batch, features).
Masks follow nn.MultiheadAttention: stored_pattern_padding_mask (B, S) bool, True where a stored pattern is
padding; association_mask (L, S) or (B * num_heads, L, S), bool (True: not associated) or float (added).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accel.ops import hopfield_update
from accel.ops._checks import check_count, is_real


class Hopfield(nn.Module):
    def __init__(self, input_size: int, hidden_size: int | None = None, output_size: int | None = None,
                 pattern_size: int | None = None, num_heads: int = 1, scaling: float | Tensor | None = None,
                 update_steps_max: int = 0, update_steps_eps: float | None = 1e-4,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_pattern_projection: bool = True, normalize_pattern_projection_affine: bool = True,
                 stored_pattern_size: int | None = None, pattern_projection_size: int | None = None,
                 batch_first: bool = True, dropout: float = 0.0, input_bias: bool = True,
                 disable_out_projection: bool = False):
        """hflayers' arguments: hidden_size is the width of each head in the Hopfield space (default
        input_size // num_heads), pattern_size the width of each head's retrieved pattern (default hidden_size),
        output_size the width of the output (default input_size), scaling beta (default 1 / sqrt(hidden_size);
        an nn.Parameter makes it learnable), update_steps_max the update steps before the retrieval (0: one
        retrieval, i.e. attention), update_steps_eps the stopping rule's threshold (None: always all steps),
        dropout the probability of dropping an entry of the final association in training."""
        super().__init__()
        check_count("Hopfield", "input_size", input_size)
        check_count("Hopfield", "num_heads", num_heads)
        for name, value in (("output_size", output_size), ("pattern_size", pattern_size),
                            ("stored_pattern_size", stored_pattern_size),
                            ("pattern_projection_size", pattern_projection_size)):
            if value is not None:
                check_count("Hopfield", name, value)
        hidden_size = hidden_size if hidden_size is not None else input_size // num_heads
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"Hopfield: `hidden_size` must be >= 1 (or `input_size` >= `num_heads`), got "
                             f"{hidden_size}")
        pattern_size = pattern_size if pattern_size is not None else hidden_size
        if not isinstance(update_steps_max, int) or update_steps_max < 0:
            raise ValueError(f"Hopfield: `update_steps_max` must be an int >= 0, got {update_steps_max!r}")
        if update_steps_eps is not None and not (is_real(update_steps_eps) and update_steps_eps >= 0):
            raise ValueError(f"Hopfield: `update_steps_eps` must be a finite number >= 0 or None, got "
                             f"{update_steps_eps!r}")
        if not (is_real(dropout) and 0.0 <= dropout < 1.0):
            raise ValueError(f"Hopfield: `dropout` must be in [0, 1), got {dropout}")
        # read once here: the op cannot check a tensor beta without a host sync on every call
        if scaling is not None and not bool(torch.isfinite(torch.as_tensor(scaling)).all()):
            raise ValueError(f"Hopfield: `scaling` must be finite, got {scaling}")
        stored_pattern_size = stored_pattern_size or input_size
        pattern_projection_size = pattern_projection_size or input_size
        self.num_heads, self.hidden_size, self.pattern_size = num_heads, hidden_size, pattern_size
        self.update_steps_max, self.update_steps_eps = update_steps_max, update_steps_eps
        self.batch_first, self.dropout = batch_first, dropout

        def norm(enabled, affine, size):
            return nn.LayerNorm(size, elementwise_affine=affine) if enabled else nn.Identity()

        self.norm_stored_pattern = norm(normalize_stored_pattern, normalize_stored_pattern_affine, stored_pattern_size)
        self.norm_state_pattern = norm(normalize_state_pattern, normalize_state_pattern_affine, input_size)
        self.norm_pattern_projection = norm(normalize_pattern_projection, normalize_pattern_projection_affine,
                                            pattern_projection_size)
        self.q_proj = nn.Linear(input_size, num_heads * hidden_size, bias=input_bias)
        self.k_proj = nn.Linear(stored_pattern_size, num_heads * hidden_size, bias=input_bias)
        self.v_proj = nn.Linear(pattern_projection_size, num_heads * pattern_size, bias=input_bias)
        self.out_proj = nn.Identity() if disable_out_projection else \
            nn.Linear(num_heads * pattern_size, output_size or input_size)
        if scaling is None:
            scaling = 1.0 / math.sqrt(hidden_size)
        if isinstance(scaling, nn.Parameter):
            self.scaling = scaling
        else:
            self.register_buffer("scaling", torch.as_tensor(scaling, dtype=torch.get_default_dtype()).reshape(()))

    def _heads(self, x: Tensor, width: int) -> Tensor:
        """(B, rows, heads * width) -> (B, heads, rows, width)."""
        return x.unflatten(-1, (self.num_heads, width)).transpose(1, 2)

    def _patterns(self, input):
        """(stored, state, projection) of forward's input, checked against the layer's sizes."""
        if isinstance(input, tuple):
            if len(input) != 3:
                raise ValueError(f"Hopfield: `input` must be one tensor or the tuple (stored_pattern, state_pattern, "
                                 f"pattern_projection), got a tuple of {len(input)}")
            names = ("stored_pattern", "state_pattern", "pattern_projection")
        else:
            input, names = (input, input, input), ("input",) * 3
        batch = 0 if self.batch_first else 1
        layout = "(B, length, {})" if self.batch_first else "(length, B, {})"
        for name, x, linear in zip(names, input, (self.k_proj, self.q_proj, self.v_proj)):
            if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
                raise TypeError(f"Hopfield: `{name}` must be a floating-point tensor, got "
                                f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
            if x.dim() != 3 or x.shape[2] != linear.in_features:
                raise ValueError(f"Hopfield: `{name}` must have shape {layout.format(linear.in_features)}, got "
                                 f"{tuple(x.shape)}")
        stored, state, projection = input
        if stored.shape[batch] not in (1, state.shape[batch]):
            raise ValueError(f"Hopfield: `{names[0]}` must have the batch of `{names[1]}` ({state.shape[batch]}) or 1, "
                             f"got shape {tuple(stored.shape)}")
        if projection.shape[:2] != stored.shape[:2]:
            raise ValueError(f"Hopfield: `{names[2]}` must have as many patterns as `{names[0]}` "
                             f"{tuple(stored.shape[:2])}, got shape {tuple(projection.shape)}")
        return input

    def _check_masks(self, padding, mask, B: int, L: int, S: int) -> None:
        if padding is not None and (not isinstance(padding, Tensor) or padding.dtype != torch.bool
                                    or padding.shape != (B, S)):
            raise ValueError(f"Hopfield: `stored_pattern_padding_mask` must be a bool tensor of shape (B, S) = "
                             f"({B}, {S})")
        if mask is None:
            return
        if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise TypeError("Hopfield: `association_mask` must be a bool or floating-point tensor")
        try:
            fits = mask.dim() in (2, 3) and torch.broadcast_shapes(mask.shape[-2:], (L, S)) == (L, S) and \
                (mask.dim() == 2 or mask.shape[0] == B * self.num_heads)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"Hopfield: `association_mask` must have shape (L, S) = ({L}, {S}) or "
                             f"(B * num_heads, L, S) = ({B * self.num_heads}, {L}, {S}), got {tuple(mask.shape)}")

    def _associate(self, stored: Tensor, state: Tensor, projection: Tensor, padding, association_mask,
                   return_association: bool):
        if not self.batch_first:
            stored, state, projection = (t.transpose(0, 1) for t in (stored, state, projection))
        B, L = state.shape[0], state.shape[1]
        self._check_masks(padding, association_mask, B, L, stored.shape[1])
        q = self._heads(self.q_proj(self.norm_state_pattern(state)), self.hidden_size)
        k = self._heads(self.k_proj(self.norm_stored_pattern(stored)), self.hidden_size)
        v = self._heads(self.v_proj(self.norm_pattern_projection(projection)), self.pattern_size)
        mask = association_mask
        if mask is not None and mask.dim() == 3:  # (B * heads, L, S), as nn.MultiheadAttention takes it
            mask = mask.reshape(-1, self.num_heads, *mask.shape[1:])
        if padding is not None and k.shape[0] != B:  # padding of stored patterns shared by the batch
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        beta = self.scaling.to(q.dtype)
        eps = self.update_steps_eps
        if self.training and self.dropout > 0:
            # the update steps through the op (values = keys: its output is the last state pattern), then the
            # retrieval with its association materialised for dropout. With the stopping rule, a row that
            # stopped early comes out of the op one update further than it stopped (the op's output is
            # P(q) k of its final q), so training with dropout and update_steps_eps may run one extra update.
            if self.update_steps_max > 0:
                q = hopfield_update(q, k, k, beta, self.update_steps_max - 1, mask=mask, key_padding_mask=padding,
                                    eps=eps)
            logits = beta * q @ k.transpose(-1, -2)
            if mask is not None:
                logits = logits + (torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, -math.inf)
                                   if mask.dtype == torch.bool else mask.to(q.dtype))
            if padding is not None:
                logits = logits.masked_fill(padding[:, None, None, :], -math.inf)
            association = F.dropout(torch.softmax(logits, dim=-1), self.dropout)
            out = association @ v
        else:
            result = hopfield_update(q, k, v, beta, self.update_steps_max, mask=mask, key_padding_mask=padding,
                                     eps=eps, return_association=return_association)
            out, association = result if return_association else (result, None)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, association

    def forward(self, input: Tensor | tuple[Tensor, Tensor, Tensor], stored_pattern_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor:
        """input: one tensor (stored patterns, state patterns and pattern projections at once) or the tuple
        (stored_pattern, state_pattern, pattern_projection)."""
        stored, state, projection = self._patterns(input)
        return self._associate(stored, state, projection, stored_pattern_padding_mask, association_mask, False)[0]

    def get_association_matrix(self, input, stored_pattern_padding_mask: Tensor | None = None,
                               association_mask: Tensor | None = None) -> Tensor:
        """The final association (B, num_heads, L, S) of ``forward(input)``, without gradients."""
        stored, state, projection = self._patterns(input)
        with torch.no_grad():
            return self._associate(stored, state, projection, stored_pattern_padding_mask, association_mask,
                                   True)[1]


class HopfieldPooling(nn.Module):
    """Pools (B, S, input_size) into (B, quantity * output_size) with ``quantity`` learned state patterns."""

    def __init__(self, input_size: int, quantity: int = 1, trainable: bool = True, **hopfield_args):
        super().__init__()
        check_count("HopfieldPooling", "quantity", quantity)
        self.hopfield = Hopfield(input_size, **hopfield_args)
        weights = torch.empty(1, quantity, input_size)
        nn.init.normal_(weights, std=input_size ** -0.5)
        self.pooling_weights = nn.Parameter(weights, requires_grad=trainable)

    def forward(self, input: Tensor, stored_pattern_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor:
        _check_input("HopfieldPooling", input, self.pooling_weights.shape[2])
        batch = 0 if self.hopfield.batch_first else 1
        state = self.pooling_weights.expand(input.shape[batch], -1, -1)
        if not self.hopfield.batch_first:
            state = state.transpose(0, 1)
        out = self.hopfield((input, state, input), stored_pattern_padding_mask, association_mask)
        return (out if self.hopfield.batch_first else out.transpose(0, 1)).flatten(1)


class HopfieldLayer(nn.Module):
    """The input's patterns (B, L, input_size) associated with a learned table of ``quantity`` stored patterns
    (and, with lookup_weights_as_separated, separate learned pattern projections): (B, L, output_size)."""

    def __init__(self, input_size: int, quantity: int = 1, lookup_weights_as_separated: bool = False,
                 trainable: bool = True, **hopfield_args):
        super().__init__()
        check_count("HopfieldLayer", "quantity", quantity)
        self.hopfield = Hopfield(input_size, **hopfield_args)
        self.lookup_weights = nn.Parameter(torch.randn(1, quantity, input_size) * input_size ** -0.5,
                                           requires_grad=trainable)
        self.target_weights = nn.Parameter(torch.randn(1, quantity, input_size) * input_size ** -0.5,
                                           requires_grad=trainable) if lookup_weights_as_separated else None

    def forward(self, input: Tensor, association_mask: Tensor | None = None) -> Tensor:
        _check_input("HopfieldLayer", input, self.lookup_weights.shape[2])
        stored = self.lookup_weights
        projection = self.target_weights if self.target_weights is not None else stored
        if not self.hopfield.batch_first:
            stored, projection = stored.transpose(0, 1), projection.transpose(0, 1)
        # stored patterns of batch 1: the op shares them across the batch
        return self.hopfield((stored, input, projection), None, association_mask)


def _check_input(module: str, input, features: int) -> None:
    """The pooling and lookup layers pass their input on inside a tuple, under other names: checked here."""
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point:
        raise TypeError(f"{module}: `input` must be a floating-point tensor, got "
                        f"{input.dtype if isinstance(input, Tensor) else type(input).__name__}")
    if input.dim() != 3 or input.shape[2] != features:
        raise ValueError(f"{module}: `input` must have shape (B, length, {features}) (batch first) or "
                         f"(length, B, {features}), got {tuple(input.shape)}")
