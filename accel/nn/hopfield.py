"""Hopfield layers (Ramsauer et al., 2020) with hflayers' constructors, arguments, defaults, parameter names and
numbers, on accel.ops.hopfield_update.

* `Hopfield`: state patterns (queries) associated with stored patterns (keys), retrieving pattern projections
  (values): LayerNorm of each input, linear maps into num_heads heads of the Hopfield space, update steps with
  a stopping rule, the retrieval and an output map.
* `HopfieldPooling`: a learned state pattern (``quantity`` of them) pools the input's patterns.
* `HopfieldLayer`: the input's patterns are the state patterns; stored patterns and their projections are a
  learned lookup table of ``quantity`` entries, shared by the whole batch (never copied per sample).

Inputs are (batch, length, features) with batch_first=True (the default), else (length, batch, features).
Masks follow nn.MultiheadAttention: stored_pattern_padding_mask (B, S), True (or nonzero) where a stored pattern
is padding; association_mask (L, S) or (B * num_heads, L, S), bool or uint8 (nonzero: not associated) or float
(added to the logits).

The parameters are hflayers' own: ``association_core.in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``
and ``v_proj_weight`` where the three inputs' sizes differ), ``association_core.in_proj_bias``,
``association_core.out_proj``, and ``norm_stored_pattern``, ``norm_state_pattern``, ``norm_pattern_projection``,
so checkpoints load both ways, and a seed gives hflayers' initial weights.

Where hflayers' code and its documentation disagree, the numbers follow the code, so that a model trained with
hflayers gives the same outputs here:
* a scaling tensor multiplies feature j of the heads' concatenated state patterns by scaling[j % num_heads];
* concat_bias_pattern creates ``bias_k`` and ``bias_v`` but nothing concatenates them;
* HopfieldPooling flattens its output from dimension 1 whatever the layout, so with batch_first=False it returns
  (quantity, batch * output_size).
Static patterns are the exception: hflayers copies them to the heads along the batch dimension, which hands
head h of sample b the pattern of sample (b * num_heads + h) mod batch; here every head of a sample gets that
sample's pattern (the same numbers wherever batch or num_heads is 1).

The update steps run in accel.ops.hopfield_update (fused, no L x S association kept for autograd) where it
serves the call; hflayers' stopping rule (a head stops once no sample's association changed by more than eps)
needs a host sync per step: a pass without gradients counts each head's updates, then the op runs them; the
options in REFERENCE_PATH run accel.reference.hopfield's loop.
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accel.ops import hopfield_update
from accel.ops._checks import check_count, is_real
from accel.reference import hopfield as reference

STOPPING_RULES = ("head", "row")

# the options that the fused op cannot serve, for `python -m accel info`
REFERENCE_PATH = (
    "update_steps_max given as a per-head tensor or as None (unbounded)",
    "scaling given as a per-head tensor; update_steps_eps given as one with stopping_rule='row'",
    "update steps with hflayers' rule (stopping_rule='head', the default) while training with dropout, or "
    "under torch.compile (elsewhere the op runs them, after a pass without gradients counts each head's updates)",
)


class _AssociationCore(nn.Module):
    """hflayers' association core: its parameters, under its names and in its order, and its initialisation
    (including the random numbers its constructor draws). The computation is Hopfield's."""

    def __init__(self, embed_dim, num_heads, bias, add_bias_kv, kdim, vdim, head_dim, pattern_dim, out_dim,
                 disable_out_projection, key_as_static, query_as_static, value_as_static, value_as_connected,
                 normalize_pattern, normalize_pattern_affine):
        super().__init__()
        self.num_heads, self.embed_dim, self.kdim, self.vdim = num_heads, embed_dim, kdim, vdim
        self.head_dim, self.pattern_dim, self.out_dim = head_dim, pattern_dim, out_dim
        self.disable_out_projection = disable_out_projection
        self.same_embed_dim = kdim == embed_dim and vdim == embed_dim and not value_as_connected and \
            pattern_dim == head_dim
        hopfield_dim = None if head_dim is None else num_heads * head_dim
        pattern_total = None if pattern_dim is None else num_heads * pattern_dim
        dynamic = (not query_as_static, not key_as_static, not value_as_static)
        self.p_norm_weight = nn.Parameter(torch.empty(head_dim)) if normalize_pattern_affine else None
        self.p_norm_bias = nn.Parameter(torch.empty(head_dim)) if normalize_pattern_affine else None
        if self.same_embed_dim:
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
            rows = dynamic[0] * hopfield_dim + dynamic[1] * hopfield_dim + dynamic[2] * pattern_total
            self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim)) if any(dynamic) else None
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(hopfield_dim, embed_dim)) if dynamic[0] else None
            self.k_proj_weight = nn.Parameter(torch.empty(hopfield_dim, kdim)) if dynamic[1] else None
            v_in = hopfield_dim if value_as_connected and not key_as_static else vdim
            self.v_proj_weight = nn.Parameter(torch.empty(pattern_total, v_in)) if dynamic[2] else None
            self.in_proj_weight = None
        self.in_proj_bias = nn.Parameter(torch.empty(
            dynamic[0] * hopfield_dim + dynamic[1] * hopfield_dim + pattern_total)) if bias and any(dynamic) else None
        self.out_proj = None if disable_out_projection else nn.Linear(pattern_total, out_dim, bias=bias)
        self.bias_k = nn.Parameter(torch.empty(1, 1, hopfield_dim)) if add_bias_kv and dynamic[1] else None
        self.bias_v = nn.Parameter(torch.empty(1, 1, hopfield_dim)) if add_bias_kv and dynamic[2] else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.p_norm_weight is not None:
            nn.init.ones_(self.p_norm_weight)
            nn.init.zeros_(self.p_norm_bias)
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=0.02)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, mean=0.0, std=0.02)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.normal_(b, mean=0.0, std=0.02)

    def projections(self, dynamic):
        """(weights, biases) of the state patterns', stored patterns' and pattern projections' maps, None for a
        static one: in_proj_weight's slices or the separate weights, and in_proj_bias's slices in the order
        q, k, v, skipping static ones."""
        sizes = (self.num_heads * self.head_dim, self.num_heads * self.head_dim, self.num_heads * self.pattern_dim)
        weights, biases, row, start = [], [], 0, 0
        for on, size, separate in zip(dynamic, sizes, (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)):
            if self.same_embed_dim:
                weights.append(self.in_proj_weight[row:row + size] if on else None)
                row += size if on else 0
            else:
                weights.append(separate)
            biases.append(self.in_proj_bias[start:start + size] if on and self.in_proj_bias is not None else None)
            start += size if on else 0
        return weights, biases

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, pattern_dim={self.pattern_dim}"


class Hopfield(nn.Module):
    def __init__(self, input_size: int | None = None, hidden_size: int | None = None, output_size: int | None = None,
                 pattern_size: int | None = None, num_heads: int = 1, scaling: float | Tensor | None = None,
                 update_steps_max: int | Tensor | None = 0, update_steps_eps: float | Tensor | None = 1e-4,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_stored_pattern_eps: float = 1e-5,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_state_pattern_eps: float = 1e-5,
                 normalize_pattern_projection: bool = True, normalize_pattern_projection_affine: bool = True,
                 normalize_pattern_projection_eps: float = 1e-5,
                 normalize_hopfield_space: bool = False, normalize_hopfield_space_affine: bool = False,
                 normalize_hopfield_space_eps: float = 1e-5,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False, pattern_projection_as_connected: bool = False,
                 stored_pattern_size: int | None = None, pattern_projection_size: int | None = None,
                 batch_first: bool = True, association_activation: str | None = None, dropout: float = 0.0,
                 input_bias: bool = True, concat_bias_pattern: bool = False, add_zero_association: bool = False,
                 disable_out_projection: bool = False, *, stopping_rule: str = "head"):
        """hflayers' arguments, in its order, with its defaults and meaning. hidden_size is the width of each
        head in the Hopfield space (default input_size // num_heads), pattern_size the width of each head's
        retrieved pattern (default hidden_size), output_size the width of the output (default input_size),
        scaling beta (default 1 / sqrt(hidden_size), kept as a Python float; a 0-dim tensor, or an
        nn.Parameter to learn it, is one beta for all heads; a (num_heads,) tensor scales as hflayers does),
        update_steps_max the update steps before the retrieval (0: one retrieval, i.e. attention; None or < 0:
        until the stopping rule ends them), update_steps_eps the stopping rule's threshold (None: no rule).

        stopping_rule (accel's): "head", hflayers' rule, stops a head once no sample's association matrix
        changed by more than update_steps_eps in an update (Frobenius norm); "row" stops each state pattern
        on its own once its association changed by less than that (Euclidean norm over the stored patterns),
        which the fused op runs without a host sync."""
        super().__init__()
        if not isinstance(batch_first, bool):
            raise TypeError(f"Hopfield: `batch_first` must be a bool, got {type(batch_first).__name__}")
        check_count("Hopfield", "num_heads", num_heads)
        for name, value in (("hidden_size", hidden_size), ("output_size", output_size),
                            ("pattern_size", pattern_size), ("stored_pattern_size", stored_pattern_size),
                            ("pattern_projection_size", pattern_projection_size)):
            if value is not None:
                check_count("Hopfield", name, value)
        for name, normalize, affine in (
                ("normalize_stored_pattern", normalize_stored_pattern, normalize_stored_pattern_affine),
                ("normalize_state_pattern", normalize_state_pattern, normalize_state_pattern_affine),
                ("normalize_pattern_projection", normalize_pattern_projection, normalize_pattern_projection_affine),
                ("normalize_hopfield_space", normalize_hopfield_space, normalize_hopfield_space_affine)):
            if affine and not normalize:
                raise ValueError(f"Hopfield: `{name}_affine` needs `{name}` (an affine map without the "
                                 f"normalisation has no effect)")
        if association_activation is not None and not callable(getattr(torch, str(association_activation), None)):
            raise ValueError(f"Hopfield: `association_activation` must name a function of torch (e.g. 'tanh'), "
                             f"got {association_activation!r}")
        if stopping_rule not in STOPPING_RULES:
            raise ValueError(f"Hopfield: `stopping_rule` must be one of {STOPPING_RULES}, got {stopping_rule!r}")
        if not (is_real(dropout) and 0.0 <= dropout < 1.0):
            raise ValueError(f"Hopfield: `dropout` must be in [0, 1), got {dropout}")
        statics = (state_pattern_as_static, stored_pattern_as_static, pattern_projection_as_static)
        static_execution = all(statics) and not pattern_projection_as_connected and not normalize_hopfield_space \
            and disable_out_projection
        if static_execution:
            input_size = stored_pattern_size = pattern_projection_size = None
            head_dim = hidden_size
        else:
            check_count("Hopfield", "input_size", input_size)
            head_dim = hidden_size if hidden_size is not None else input_size // num_heads
            if head_dim < 1:
                raise ValueError(f"Hopfield: `hidden_size` must be >= 1 (or `input_size` >= `num_heads`), got "
                                 f"{head_dim}")
        kdim = stored_pattern_size if stored_pattern_size is not None else input_size
        vdim = pattern_projection_size if pattern_projection_size is not None else input_size
        if pattern_projection_as_connected and kdim != vdim:
            raise ValueError(f"Hopfield: `pattern_projection_as_connected` needs the stored patterns' and pattern "
                             f"projections' sizes to agree, got {kdim} and {vdim}")
        if normalize_hopfield_space_affine and head_dim is None:
            raise ValueError("Hopfield: `normalize_hopfield_space_affine` needs `hidden_size`")
        self._steps_max, self._steps_eps = self._check_steps(update_steps_max, update_steps_eps, num_heads)
        rounds = int(torch.as_tensor(self._steps_max).max())
        self._rounds = None if bool((torch.as_tensor(self._steps_max) < 0).any()) else rounds
        scaling = self._check_scaling(scaling, num_heads, head_dim, static_execution)
        self.num_heads, self.dropout, self.stopping_rule = num_heads, dropout, stopping_rule
        self.association_core = _AssociationCore(
            input_size, num_heads, input_bias, concat_bias_pattern, kdim, vdim, head_dim,
            pattern_size if pattern_size is not None else head_dim,
            output_size if output_size is not None else input_size, disable_out_projection,
            stored_pattern_as_static, state_pattern_as_static, pattern_projection_as_static,
            pattern_projection_as_connected, normalize_hopfield_space, normalize_hopfield_space_affine)
        self._static = {"state": state_pattern_as_static, "stored": stored_pattern_as_static,
                        "projection": pattern_projection_as_static}
        self._connected, self._add_zero = pattern_projection_as_connected, add_zero_association
        self._hopfield_space_eps = normalize_hopfield_space_eps if normalize_hopfield_space else None
        self._activation = association_activation

        def norm(enabled, affine, size, eps):
            return nn.LayerNorm(size, eps=eps, elementwise_affine=affine) if enabled else None

        self.norm_stored_pattern = norm(normalize_stored_pattern, normalize_stored_pattern_affine,
                                        kdim, normalize_stored_pattern_eps)
        self.norm_state_pattern = norm(normalize_state_pattern, normalize_state_pattern_affine,
                                       input_size, normalize_state_pattern_eps)
        self.norm_pattern_projection = norm(normalize_pattern_projection, normalize_pattern_projection_affine,
                                            vdim, normalize_pattern_projection_eps)
        # registered last, as hflayers' attribute of the same name (an nn.Parameter becomes a parameter)
        self.__scaling = scaling
        self.__batch_first = batch_first
        self.reset_parameters()

    @staticmethod
    def _check_steps(steps_max, eps, num_heads):
        """update_steps_max as an int (-1: unbounded) or a (num_heads,) integer tensor; eps as a float, a
        (num_heads,) tensor or None."""
        if steps_max is None:
            steps_max = -1
        if isinstance(steps_max, Tensor):
            if steps_max.shape != (num_heads,) or steps_max.dtype.is_floating_point:
                raise ValueError(f"Hopfield: `update_steps_max` as a tensor must hold one integer per head, shape "
                                 f"({num_heads},), got {steps_max.dtype} of shape {tuple(steps_max.shape)}")
        elif not isinstance(steps_max, int) or isinstance(steps_max, bool):
            raise ValueError(f"Hopfield: `update_steps_max` must be an int, a per-head tensor or None, got "
                             f"{steps_max!r}")
        if isinstance(eps, Tensor):
            if eps.shape != (num_heads,) or not bool((eps > 0).all()):
                raise ValueError(f"Hopfield: `update_steps_eps` as a tensor must hold one positive threshold per "
                                 f"head, shape ({num_heads},), got {eps}")
        elif eps is not None and not (is_real(eps) and eps >= 0):
            raise ValueError(f"Hopfield: `update_steps_eps` must be a finite number >= 0, a per-head tensor or "
                             f"None, got {eps!r}")
        unbounded = bool((torch.as_tensor(steps_max) < 0).any())
        if unbounded and (eps is None or (not isinstance(eps, Tensor) and eps == 0)):
            raise ValueError("Hopfield: `update_steps_max` None (or < 0) runs until the stopping rule ends the "
                             "updates, so `update_steps_eps` must be > 0")
        return steps_max, eps

    @staticmethod
    def _check_scaling(scaling, num_heads, head_dim, static_execution):
        if scaling is None:
            return 1.0 if static_execution else 1.0 / math.sqrt(head_dim)
        if isinstance(scaling, Tensor):
            # read once here: the op cannot check a tensor beta without a host sync on every call
            if scaling.dim() > 1 or (scaling.dim() == 1 and scaling.shape[0] != num_heads):
                raise ValueError(f"Hopfield: `scaling` as a tensor must be 0-dim or hold one entry per head, shape "
                                 f"({num_heads},), got shape {tuple(scaling.shape)}")
            if not bool(torch.isfinite(scaling).all()):
                raise ValueError(f"Hopfield: `scaling` must be finite, got {scaling}")
            return scaling
        if not is_real(scaling):
            raise ValueError(f"Hopfield: `scaling` must be a finite number or a tensor, got {scaling}")
        return float(scaling)

    def reset_parameters(self) -> None:
        for module in (self.association_core, self.norm_stored_pattern, self.norm_state_pattern,
                       self.norm_pattern_projection):
            if module is not None:
                module.reset_parameters()

    def _heads(self, x: Tensor, static: bool) -> Tensor:
        """(B, rows, heads * width) -> (B, heads, rows, width); a static pattern (B, rows, width) goes to every
        head of its sample."""
        if static:
            return x.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _widths(self):
        """The feature widths forward expects of (stored, state, projection); None: any (static execution)."""
        core, static = self.association_core, self._static
        head = core.head_dim
        stored = head if static["stored"] else core.kdim
        state = head if static["state"] else core.embed_dim
        projection = core.vdim if not static["projection"] or (self._connected and not static["stored"]) \
            else core.pattern_dim
        return stored, state, projection

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
        for name, x, width in zip(names, input, self._widths()):
            if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
                raise TypeError(f"Hopfield: `{name}` must be a floating-point tensor, got "
                                f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
            if x.dim() != 3 or (width is not None and x.shape[2] != width):
                raise ValueError(f"Hopfield: `{name}` must have shape {layout.format(width or 'features')}, got "
                                 f"{tuple(x.shape)}")
        stored, state, projection = input
        if stored.shape[batch] not in (1, state.shape[batch]):
            raise ValueError(f"Hopfield: `{names[0]}` must have the batch of `{names[1]}` ({state.shape[batch]}) or 1, "
                             f"got shape {tuple(stored.shape)}")
        if projection.shape[:2] != stored.shape[:2]:
            raise ValueError(f"Hopfield: `{names[2]}` must have as many patterns as `{names[0]}` "
                             f"{tuple(stored.shape[:2])}, got shape {tuple(projection.shape)}")
        return input

    def _masks(self, padding, mask, B: int, L: int, S: int):
        """The two masks checked, uint8 read as bool (nonzero: masked), association_mask as (1 or B, heads, L, S)."""
        if padding is not None:
            if not isinstance(padding, Tensor) or padding.dtype not in (torch.bool, torch.uint8) \
                    or padding.shape != (B, S):
                raise ValueError(f"Hopfield: `stored_pattern_padding_mask` must be a bool (or uint8) tensor of shape "
                                 f"(B, S) = ({B}, {S})")
            padding = padding.bool()
        if mask is None:
            return padding, None
        if not isinstance(mask, Tensor) or not (mask.dtype in (torch.bool, torch.uint8)
                                                or mask.dtype.is_floating_point):
            raise TypeError("Hopfield: `association_mask` must be a bool, uint8 or floating-point tensor")
        try:
            fits = mask.dim() in (2, 3) and torch.broadcast_shapes(mask.shape[-2:], (L, S)) == (L, S) and \
                (mask.dim() == 2 or mask.shape[0] == B * self.num_heads)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"Hopfield: `association_mask` must have shape (L, S) = ({L}, {S}) or "
                             f"(B * num_heads, L, S) = ({B * self.num_heads}, {L}, {S}), got {tuple(mask.shape)}")
        if mask.dtype == torch.uint8:
            mask = mask.bool()
        if mask.dim() == 3:  # (B * heads, L, S), as nn.MultiheadAttention takes it
            mask = mask.reshape(-1, self.num_heads, *mask.shape[1:])
        return padding, mask

    def _project(self, stored: Tensor, state: Tensor, projection: Tensor):
        """q, k, v as (B, heads, rows, width): the inputs' normalisations, maps and the Hopfield space's
        normalisation, as hflayers' forward runs them (scaling not applied)."""
        core, static = self.association_core, self._static
        if self.norm_stored_pattern is not None:
            stored = self.norm_stored_pattern(stored)
        if self.norm_state_pattern is not None:
            state = self.norm_state_pattern(state)
        if self.norm_pattern_projection is not None:
            projection = self.norm_pattern_projection(projection)
        if core.same_embed_dim:
            stored, projection = self._route_as_hflayers(stored, state, projection)
        (wq, wk, wv), (bq, bk, bv) = core.projections((not static["state"], not static["stored"],
                                                      not static["projection"]))
        q = state if static["state"] else F.linear(state, wq, bq)
        k = stored if static["stored"] else F.linear(stored, wk, bk)
        v, v_static = projection, static["projection"]
        if self._connected and not static["stored"]:
            v, v_static = F.linear(projection, wk, bk), False  # through the stored patterns' map: per head
        if not static["projection"]:
            v = F.linear(v, wv, bv)
        q, k, v = self._heads(q, static["state"]), self._heads(k, static["stored"]), self._heads(v, v_static)
        if self._hopfield_space_eps is not None:
            shape = (q.shape[-1],)
            q = F.layer_norm(q, shape, core.p_norm_weight, core.p_norm_bias, self._hopfield_space_eps)
            k = F.layer_norm(k, shape, core.p_norm_weight, core.p_norm_bias, self._hopfield_space_eps)
        return q, k, v

    def _route_as_hflayers(self, stored: Tensor, state: Tensor, projection: Tensor):
        """hflayers maps its normalised inputs with one in_proj_weight, and where they are equal it maps one of
        them for all: the state patterns for all three when all are equal, the stored patterns for both when
        those and the projections are equal. The values are the same either way, but the gradient reaches only
        the mapped input's normalisation (the others' stay None), so an optimiser moves the normalisations as
        it does with hflayers. Eagerly this reads torch.equal, as hflayers does; compiled, the choice is
        torch.where on an all-equal flag (no graph break; the skipped inputs then get zero gradients)."""
        static = self._static
        if static["stored"] or static["projection"] or stored.shape != projection.shape:
            return stored, projection
        with_state = not static["state"] and state.shape == stored.shape
        if torch.compiler.is_compiling():
            pair = (stored == projection).all()
            if with_state:
                triple = pair & (state == stored).all()
                return torch.where(triple, state, stored), \
                    torch.where(triple, state, torch.where(pair, stored, projection))
            return stored, torch.where(pair, stored, projection)
        if torch.equal(stored, projection):
            return (state, state) if with_state and torch.equal(state, stored) else (stored, stored)
        return stored, projection

    def _feature_scale(self, width: int, like: Tensor) -> Tensor:
        """A (num_heads,) scaling as hflayers applies it: feature j of the heads' concatenation (head j // width)
        times scaling[j % num_heads], shaped (heads, 1, width) to broadcast against (B, heads, L, width)."""
        index = torch.arange(self.num_heads * width, device=like.device) % self.num_heads
        return self.__scaling.to(like)[index].reshape(self.num_heads, 1, width)

    def _path(self, q: Tensor) -> str:
        """Which retrieval serves the call: "op" (accel.ops.hopfield_update as it is), "op per head" (hflayers'
        rule: each head's update count found first without gradients, then the op at that count), or
        "reference" (accel.reference.hopfield's loop; see REFERENCE_PATH)."""
        steps, eps = self._steps_max, self._steps_eps
        if isinstance(steps, Tensor) or steps < 0 or (isinstance(self.__scaling, Tensor) and self.__scaling.dim()):
            return "reference"
        if steps == 0 or eps is None or (self.stopping_rule == "row" and not isinstance(eps, Tensor)):
            return "op"
        if self.stopping_rule == "row" or (self.training and self.dropout > 0) or q.shape[0] == 0 \
                or torch.compiler.is_compiling():
            return "reference"
        return "op per head"

    def _associate(self, stored: Tensor, state: Tensor, projection: Tensor, padding, association_mask,
                   want: str = "output"):
        if not self.batch_first:
            stored, state, projection = (t.transpose(0, 1) for t in (stored, state, projection))
        B, L, S = state.shape[0], state.shape[1], stored.shape[1]
        padding, mask = self._masks(padding, association_mask, B, L, S)
        q, k, v = self._project(stored, state, projection)
        if self._add_zero:  # one stored pattern of zeros, and its projection; never masked
            k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
            padding = None if padding is None else F.pad(padding, (0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
        if want == "projection":
            return v.expand(B, -1, -1, -1)
        if padding is not None and k.shape[0] != B:  # padding of stored patterns shared by the batch
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        path = self._path(q)
        if path == "op":
            out, association = self._fused_retrieval(q, k, v, padding, mask, want == "association")
        elif path == "op per head":
            out, association = self._per_head_retrieval(q, k, v, padding, mask, want == "association")
        else:
            out, association = self._reference_retrieval(q, k, v, padding, mask)
        if want == "association":
            return association
        out = out.transpose(1, 2).flatten(2)
        if self.association_core.out_proj is not None:
            out = self.association_core.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if self._activation is not None:
            out = getattr(torch, self._activation)(out)
        return out

    def _fused_retrieval(self, q, k, v, padding, mask, return_association: bool):
        beta = self.__scaling
        beta = beta.to(q) if isinstance(beta, Tensor) else beta
        steps = self._steps_max
        eps = self._steps_eps if steps > 0 and self.stopping_rule == "row" else None
        if self.training and self.dropout > 0:
            # the update steps through the op (values = keys: its output is the last state pattern), then the
            # retrieval with its association materialised for dropout. With the row rule, a row that stopped
            # early comes out of the op one update further than it stopped (the op's output is P(q) k of its
            # final q), so training with dropout and stopping_rule="row" may run one extra update.
            if steps > 0:
                q = hopfield_update(q, k, k, beta, steps - 1, mask=mask, key_padding_mask=padding, eps=eps)
            association = reference.association(q, k, beta, reference.additive_mask(padding, mask, q.dtype))
            return F.dropout(association, self.dropout) @ v, association
        result = hopfield_update(q, k, v, beta, steps, mask=mask, key_padding_mask=padding, eps=eps,
                                 return_association=return_association)
        return result if return_association else (result, None)

    def _per_head_retrieval(self, q, k, v, padding, mask, return_association: bool):
        """hflayers' per-head rule on the op: a pass without gradients (no association kept, one host read per
        update, as hflayers) finds how many updates each head makes; then the op runs each group of heads with
        the same count for exactly that many, its backward recomputing instead of keeping L x S per update."""
        beta = self.__scaling
        beta = beta.to(q) if isinstance(beta, Tensor) else beta
        with torch.no_grad():
            _, updates = reference.association_per_head(
                q, k, beta, torch.full((self.num_heads,), self._steps_max, device=q.device),
                torch.as_tensor(self._steps_eps, dtype=q.dtype, device=q.device).expand(self.num_heads),
                reference.additive_mask(padding, mask, q.dtype), rounds=self._rounds, return_updates=True)
        counts = updates[0, :, 0].tolist()
        groups = {}
        for head, count in enumerate(counts):
            groups.setdefault(count, []).append(head)
        if len(groups) == 1:
            result = hopfield_update(q, k, v, beta, counts[0], mask=mask, key_padding_mask=padding,
                                     return_association=return_association)
            return result if return_association else (result, None)
        outs, associations, order = [], [], []
        for count, heads in groups.items():
            index = torch.tensor(heads, device=q.device)
            head_mask = mask.index_select(1, index) if mask is not None and mask.dim() == 4 and mask.shape[1] > 1 \
                else mask
            result = hopfield_update(q.index_select(1, index), k.index_select(1, index), v.index_select(1, index),
                                     beta, count, mask=head_mask, key_padding_mask=padding,
                                     return_association=return_association)
            out, association = result if return_association else (result, None)
            outs.append(out)
            associations.append(association)
            order += heads
        inverse = torch.argsort(torch.tensor(order, device=q.device))
        out = torch.cat(outs, 1).index_select(1, inverse)
        return out, torch.cat(associations, 1).index_select(1, inverse) if return_association else None

    def _reference_retrieval(self, q, k, v, padding, mask):
        scaling = self.__scaling
        if isinstance(scaling, Tensor):
            scale = self._feature_scale(q.shape[-1], q) if scaling.dim() == 1 else scaling.to(q)
        else:
            scale = scaling
        steps = torch.as_tensor(self._steps_max, device=q.device).expand(self.num_heads)
        eps = self._steps_eps
        eps = None if eps is None else torch.as_tensor(eps, dtype=q.dtype, device=q.device).expand(self.num_heads)
        association = reference.association_per_head(q, k, scale, steps, eps, reference.additive_mask(
            padding, mask, q.dtype), per_row=self.stopping_rule == "row", rounds=self._rounds)
        return F.dropout(association, self.dropout, self.training) @ v, association

    def forward(self, input: Tensor | tuple[Tensor, Tensor, Tensor], stored_pattern_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor:
        """input: one tensor (stored patterns, state patterns and pattern projections at once) or the tuple
        (stored_pattern, state_pattern, pattern_projection)."""
        return self._associate(*self._patterns(input), stored_pattern_padding_mask, association_mask)

    def get_association_matrix(self, input, stored_pattern_padding_mask: Tensor | None = None,
                               association_mask: Tensor | None = None) -> Tensor:
        """The final association (B, num_heads, L, S) of ``forward(input)``, without gradients."""
        with torch.no_grad():
            return self._associate(*self._patterns(input), stored_pattern_padding_mask, association_mask,
                                   "association")

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask: Tensor | None = None,
                                     association_mask: Tensor | None = None) -> Tensor:
        """The pattern projections in the Hopfield space, (B, num_heads, S, pattern_size), without gradients."""
        with torch.no_grad():
            return self._associate(*self._patterns(input), stored_pattern_padding_mask, association_mask,
                                   "projection")

    @property
    def batch_first(self) -> bool:
        return self.__batch_first

    @property
    def scaling(self) -> float | Tensor:
        return self.__scaling.clone() if isinstance(self.__scaling, Tensor) else self.__scaling

    @property
    def update_steps_max(self) -> int | Tensor:
        return self._steps_max.clone() if isinstance(self._steps_max, Tensor) else self._steps_max

    @property
    def update_steps_eps(self) -> float | Tensor | None:
        return self._steps_eps.clone() if isinstance(self._steps_eps, Tensor) else self._steps_eps

    @property
    def stored_pattern_dim(self) -> int | None:
        return self.association_core.kdim

    @property
    def state_pattern_dim(self) -> int | None:
        return self.association_core.embed_dim

    @property
    def pattern_projection_dim(self) -> int | None:
        return self.association_core.vdim

    @property
    def input_size(self) -> int | None:
        return self.association_core.embed_dim

    @property
    def hidden_size(self) -> int | None:
        return self.association_core.head_dim

    @property
    def output_size(self) -> int | None:
        return self.association_core.out_dim

    @property
    def pattern_size(self) -> int | None:
        return self.association_core.pattern_dim

    @property
    def stored_pattern_as_static(self) -> bool:
        return self._static["stored"]

    @property
    def state_pattern_as_static(self) -> bool:
        return self._static["state"]

    @property
    def pattern_projection_as_static(self) -> bool:
        return self._static["projection"]

    @property
    def normalize_stored_pattern(self) -> bool:
        return self.norm_stored_pattern is not None

    @property
    def normalize_stored_pattern_affine(self) -> bool:
        return self.normalize_stored_pattern and self.norm_stored_pattern.elementwise_affine

    @property
    def normalize_state_pattern(self) -> bool:
        return self.norm_state_pattern is not None

    @property
    def normalize_state_pattern_affine(self) -> bool:
        return self.normalize_state_pattern and self.norm_state_pattern.elementwise_affine

    @property
    def normalize_pattern_projection(self) -> bool:
        return self.norm_pattern_projection is not None

    @property
    def normalize_pattern_projection_affine(self) -> bool:
        return self.normalize_pattern_projection and self.norm_pattern_projection.elementwise_affine

    @property
    def normalize_hopfield_space(self) -> bool:
        return self._hopfield_space_eps is not None

    @property
    def normalize_hopfield_space_affine(self) -> bool:
        return self.association_core.p_norm_weight is not None


class _Wrapper(nn.Module):
    """What HopfieldPooling and HopfieldLayer share: a Hopfield module, a ``quantity`` of learned patterns laid
    out (1, quantity, size) with batch_first (else (quantity, 1, size)), and hflayers' properties."""

    def _make_hopfield(self, arguments: dict, accel_options: dict) -> None:
        """self.hopfield from the wrapper's own arguments (``locals()``): those that Hopfield takes."""
        names = [p.name for p in inspect.signature(Hopfield).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        self.hopfield = Hopfield(**{name: arguments[name] for name in names if name in arguments}, **accel_options)

    def get_association_matrix(self, input, stored_pattern_padding_mask: Tensor | None = None,
                               association_mask: Tensor | None = None) -> Tensor:
        return self.hopfield.get_association_matrix(self._prepare_input(input), stored_pattern_padding_mask,
                                                    association_mask)

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask: Tensor | None = None,
                                     association_mask: Tensor | None = None) -> Tensor:
        return self.hopfield.get_projected_pattern_matrix(self._prepare_input(input), stored_pattern_padding_mask,
                                                          association_mask)

    def _learned(self, quantity: int, size: int, trainable: bool) -> nn.Parameter:
        check_count(type(self).__name__, "quantity", quantity)
        shape = (1, quantity, size) if self.hopfield.batch_first else (quantity, 1, size)
        return nn.Parameter(torch.empty(shape), requires_grad=trainable)

    def _check_input(self, input, features: int) -> None:
        """The input goes on inside a tuple, under other names: checked here to name it."""
        module = type(self).__name__
        if not isinstance(input, Tensor) or not input.dtype.is_floating_point:
            raise TypeError(f"{module}: `input` must be a floating-point tensor, got "
                            f"{input.dtype if isinstance(input, Tensor) else type(input).__name__}")
        if input.dim() != 3 or input.shape[2] != features:
            raise ValueError(f"{module}: `input` must have shape (B, length, {features}) (batch first) or "
                             f"(length, B, {features}), got {tuple(input.shape)}")

    def _expanded(self, weights: Tensor, batch: int) -> Tensor:
        return weights.expand(batch, -1, -1) if self.batch_first else weights.expand(-1, batch, -1)

    @property
    def quantity(self) -> int:
        return self._quantity


for _name in ("batch_first", "scaling", "stored_pattern_dim", "state_pattern_dim", "pattern_projection_dim",
              "input_size", "hidden_size", "output_size", "pattern_size", "update_steps_max", "update_steps_eps",
              "stored_pattern_as_static", "state_pattern_as_static", "pattern_projection_as_static",
              "normalize_stored_pattern", "normalize_stored_pattern_affine", "normalize_state_pattern",
              "normalize_state_pattern_affine", "normalize_pattern_projection", "normalize_pattern_projection_affine",
              "normalize_hopfield_space", "normalize_hopfield_space_affine"):
    # hflayers' wrappers pass these properties through from their Hopfield module
    setattr(_Wrapper, _name, property(lambda self, _n=_name: getattr(self.hopfield, _n)))
del _name


class HopfieldPooling(_Wrapper):
    """Pools (B, S, input_size) into (B, quantity * output_size) with ``quantity`` learned state patterns."""

    def __init__(self, input_size: int, hidden_size: int | None = None, output_size: int | None = None,
                 pattern_size: int | None = None, num_heads: int = 1, scaling: float | Tensor | None = None,
                 update_steps_max: int | Tensor | None = 0, update_steps_eps: float | Tensor | None = 1e-4,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_pattern_projection: bool = True, normalize_pattern_projection_affine: bool = True,
                 normalize_hopfield_space: bool = False, normalize_hopfield_space_affine: bool = False,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False, pattern_projection_as_connected: bool = False,
                 stored_pattern_size: int | None = None, pattern_projection_size: int | None = None,
                 batch_first: bool = True, association_activation: str | None = None, dropout: float = 0.0,
                 input_bias: bool = True, concat_bias_pattern: bool = False, add_zero_association: bool = False,
                 disable_out_projection: bool = False, quantity: int = 1, trainable: bool = True, **accel_options):
        """hflayers' arguments (those of Hopfield, then quantity and trainable); accel_options: Hopfield's
        keyword-only ones (stopping_rule) and the normalisations' eps."""
        super().__init__()
        self._make_hopfield(locals(), accel_options)
        self._quantity = quantity
        size = self.hopfield.hidden_size if state_pattern_as_static else self.hopfield.input_size
        self.pooling_weights = self._learned(quantity, size, trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.pooling_weights, mean=0.0, std=0.02)

    def _prepare_input(self, input):
        """(stored, state, projection): input is one tensor (stored patterns and their projections) or the pair."""
        if isinstance(input, tuple):
            if len(input) != 2:
                raise ValueError(f"HopfieldPooling: `input` must be one tensor or the pair (stored_pattern, "
                                 f"pattern_projection), got a tuple of {len(input)}")
            stored, projection = input
        else:
            stored = projection = input
        self._check_input(stored, self.hopfield._widths()[0])
        state = self._expanded(self.pooling_weights, stored.shape[0 if self.batch_first else 1])
        return stored, state, projection

    def forward(self, input: Tensor | tuple[Tensor, Tensor], stored_pattern_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor:
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask, association_mask).flatten(1)


class HopfieldLayer(_Wrapper):
    """The input's patterns (B, L, input_size) associated with a learned table of ``quantity`` stored patterns
    (and, with lookup_weights_as_separated, separate learned pattern projections): (B, L, output_size)."""

    def __init__(self, input_size: int, hidden_size: int | None = None, output_size: int | None = None,
                 pattern_size: int | None = None, num_heads: int = 1, scaling: float | Tensor | None = None,
                 update_steps_max: int | Tensor | None = 0, update_steps_eps: float | Tensor | None = 1e-4,
                 lookup_weights_as_separated: bool = False, lookup_targets_as_trainable: bool = True,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_pattern_projection: bool = True, normalize_pattern_projection_affine: bool = True,
                 normalize_hopfield_space: bool = False, normalize_hopfield_space_affine: bool = False,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False, pattern_projection_as_connected: bool = False,
                 stored_pattern_size: int | None = None, pattern_projection_size: int | None = None,
                 batch_first: bool = True, association_activation: str | None = None, dropout: float = 0.0,
                 input_bias: bool = True, concat_bias_pattern: bool = False, add_zero_association: bool = False,
                 disable_out_projection: bool = False, quantity: int = 1, trainable: bool = True, **accel_options):
        """hflayers' arguments (Hopfield's with lookup_weights_as_separated and lookup_targets_as_trainable after
        update_steps_eps, then quantity and trainable); accel_options as HopfieldPooling's."""
        super().__init__()
        self._make_hopfield(locals(), accel_options)
        self._quantity = quantity
        size = self.hopfield.hidden_size if stored_pattern_as_static else self.hopfield.stored_pattern_dim
        self.lookup_weights = self._learned(quantity, size, trainable)
        if lookup_weights_as_separated:
            target_size = size if pattern_projection_size is None else pattern_projection_size
            self.target_weights = self._learned(quantity, target_size, lookup_targets_as_trainable)
        else:
            self.register_parameter("target_weights", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.lookup_weights, mean=0.0, std=0.02)
        if self.target_weights is not None:
            nn.init.normal_(self.target_weights, mean=0.0, std=0.02)

    def _prepare_input(self, input):
        """(stored, state, projection): the lookup table with batch 1, which the op shares across the batch."""
        self._check_input(input, self.hopfield._widths()[1])
        projection = self.target_weights if self.target_weights is not None else self.lookup_weights
        return self.lookup_weights, input, projection

    def forward(self, input: Tensor, stored_pattern_padding_mask: Tensor | None = None,
                association_mask: Tensor | None = None) -> Tensor:
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask, association_mask)
