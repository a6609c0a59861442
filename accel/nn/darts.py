"""DARTS' search cell and network (Liu et al., 2019; quark0/darts cnn/model_search.py) on accel.nn.MixedOp,
with the variants people search with: PC-DARTS' partial channels and edge normalisation, GDAS' gumbel
sampling, sharpDARTS' max-w weighting and DARTS-PT's perturbation-based selection.

The constructor, structure, module names, state_dict keys, methods (``_loss``, ``new``, ``arch_parameters``,
``genotype``) and genotype rule are DARTS', so that DARTS' train_search.py and Architect (first and second
order) run with only the import changed. As in DARTS, the architecture parameters ``alphas_normal`` and
``alphas_reduce`` (and PC-DARTS' ``betas_*``) are leaf tensors outside ``parameters()`` and ``state_dict()``:
``SGD(model.parameters())`` trains the weights alone, and a checkpoint holds the weights alone. Unlike DARTS'
``.cuda()`` at construction, they follow the network's ``.to()``. With ``register_arch_parameters=True`` they are
nn.Parameters instead, so that DataParallel/DDP replicate them and state_dict() saves them; give the weight
optimiser ``weights_parameters()`` then.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from accel.nn.mixed_op import MixedOp
from accel.ops._checks import check_count, is_real
from accel.reference.darts import PRIMITIVES, FactorizedReduce, ReLUConvBN

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

WEIGHTINGS = ("softmax", "gumbel", "gumbel_hard", "max_w")


def edge_weights(alpha: torch.Tensor, weighting: str = "softmax", tau: float = 1.0):
    """The mixing weights of each edge (row of ``alpha``) under a weighting mode, with no host sync.

    - ``softmax``: DARTS' ``softmax(alpha / tau)``.
    - ``gumbel``: the soft gumbel-softmax ``softmax((log_softmax(alpha) + g) / tau)``, g ~ Gumbel(0, 1).
    - ``gumbel_hard``: GDAS: the one-hot of the gumbel-softmax's argmax, with the soft weights' gradient
      (straight-through: ``one_hot - p.detach() + p``).
    - ``max_w``: sharpDARTS: ``1 - max(w).detach() + w`` with w the softmax, so the strongest op weighs 1.

    Returns (weights, index): index is the sampled op per edge for ``gumbel_hard`` (a tensor), else None.
    """
    if weighting == "softmax":
        return F.softmax(alpha / tau, dim=-1), None
    if weighting == "max_w":
        w = F.softmax(alpha / tau, dim=-1)
        return 1 - w.max(dim=-1, keepdim=True).values.detach() + w, None
    if weighting not in ("gumbel", "gumbel_hard"):
        raise ValueError(f"unknown weighting {weighting!r}; known: {WEIGHTINGS}")
    gumbels = -torch.empty_like(alpha).exponential_().log()
    probs = F.softmax((F.log_softmax(alpha, dim=-1) + gumbels) / tau, dim=-1)
    if weighting == "gumbel":
        return probs, None
    index = probs.argmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index.unsqueeze(-1), 1.0)
    return one_hot - probs.detach() + probs, index


def node_edge_weights(beta: torch.Tensor, steps: int) -> torch.Tensor:
    """PC-DARTS' edge normalisation: a softmax of ``beta`` over the incoming edges of each node."""
    parts, start = [], 0
    for i in range(steps):
        parts.append(F.softmax(beta[start:start + 2 + i], dim=-1))
        start += 2 + i
    return torch.cat(parts)


class Cell(nn.Module):
    """A search cell: two preprocessed inputs and ``steps`` intermediate nodes, each node the sum of the
    mixed ops on the edges from every earlier node. The output concatenates the last ``multiplier`` nodes."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, mixed_op=MixedOp, partial_channels: int = 1):
        super().__init__()
        for name, value in (("steps", steps), ("C_prev_prev", C_prev_prev), ("C_prev", C_prev), ("C", C)):
            check_count("Cell", name, value)
        if not (isinstance(multiplier, int) and 1 <= multiplier <= steps + 2):
            raise ValueError(f"Cell: `multiplier` must be an int in [1, steps + 2] = [1, {steps + 2}] (the nodes "
                             f"concatenated), got {multiplier!r}")
        self._inputs = (C_prev_prev, C_prev)
        self.reduction = reduction
        # After a reduction cell, s0 is at twice s1's resolution and must be halved too.
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                # In a reduction cell only the edges leaving the two cell inputs reduce.
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(mixed_op(C, stride, partial_channels=partial_channels))

    def forward(self, s0, s1, weights, index=None, edge_scale=None):
        """``weights``: (number of edges, number of primitives), one row per edge in construction order;
        ``index``: GDAS' sampled op per edge (a list of ints), or None; ``edge_scale``: PC-DARTS' normalised
        edge weights (one per edge), or None."""
        for name, s, channels in (("s0", s0, self._inputs[0]), ("s1", s1, self._inputs[1])):
            if not isinstance(s, torch.Tensor) or s.dim() != 4 or s.shape[1] != channels:
                raise ValueError(f"Cell: `{name}` must be a (N, {channels}, H, W) tensor, got "
                                 f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        edges = len(self._ops)
        if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or weights.shape[0] != edges:
            raise ValueError(f"Cell: `weights` must be a (edges, primitives) tensor with {edges} edges, got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        if index is not None and len(index) != edges:
            raise ValueError(f"Cell: `index` must hold one sampled operation per edge, {edges}, got {len(index)}")
        if edge_scale is not None and tuple(edge_scale.shape) != (edges,):
            raise ValueError(f"Cell: `edge_scale` must have shape ({edges},), got {tuple(edge_scale.shape)}")
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            terms = []
            for j, h in enumerate(states):
                e = offset + j
                out = self._ops[e](h, weights[e]) if index is None else self._ops[e](h, weights[e], index[e])
                terms.append(out if edge_scale is None else edge_scale[e] * out)
            offset += len(states)
            states.append(sum(terms))
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """DARTS' search network: a conv stem, ``layers`` cells with reductions at layers//3 and 2*layers//3,
    global average pooling and a linear classifier.

    Args:
        mixed_op: the edge class (accel.nn.MixedOp, or accel.reference.darts.MixedOp for the eager twin with
            the same parameters).
        weighting: how architecture logits become edge weights, see ``edge_weights`` (DARTS: 'softmax';
            GDAS: 'gumbel_hard', where each edge runs only its sampled op; sharpDARTS: 'max_w').
        tau: the softmax / gumbel-softmax temperature (an attribute: anneal it by assigning ``net.tau``).
        partial_channels: PC-DARTS' K (1: DARTS).
        edge_normalization: PC-DARTS' edge normalisation: architecture parameters ``betas_normal`` and
            ``betas_reduce`` weigh each node's incoming edges by a softmax, and the genotype ranks edges by
            op weight times edge weight.

    With ``weighting='gumbel_hard'`` the sampled indices are read on the host once per forward (a host sync
    on a GPU), so that each edge runs one op.
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, criterion=None, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, mixed_op=MixedOp, *, weighting: str = "softmax",
                 tau: float = 1.0, partial_channels: int = 1, edge_normalization: bool = False,
                 register_arch_parameters: bool = False):
        super().__init__()
        if criterion is not None and not callable(criterion):
            raise TypeError(f"Network: `criterion` (DARTS' 4th argument, the loss of `_loss`) must be callable, got "
                            f"{criterion!r}; pass `steps` and the rest by keyword")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Network: unknown `weighting` {weighting!r}; known: {WEIGHTINGS}")
        for name, value in (("C", C), ("num_classes", num_classes), ("layers", layers), ("steps", steps),
                            ("multiplier", multiplier), ("stem_multiplier", stem_multiplier)):
            check_count("Network", name, value)
        if not (is_real(tau) and tau > 0):
            raise ValueError(f"Network: `tau` must be a finite number > 0, got {tau!r}")
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion
        self._steps = steps
        self._multiplier = multiplier
        self._stem_multiplier = stem_multiplier
        self._mixed_op = mixed_op
        self._options = dict(weighting=weighting, tau=tau, partial_channels=partial_channels,
                             edge_normalization=edge_normalization, register_arch_parameters=register_arch_parameters)
        self.weighting = weighting
        self.tau = tau

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                   mixed_op, partial_channels))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()
        num_edges = self.alphas_normal.shape[0]
        # DARTS-PT's state: edges fixed to one op (-1: not fixed) and (edge, op) pairs masked out. Not saved:
        # they belong to a selection in progress, not to the network.
        self.register_buffer("fixed_ops", torch.full((2, num_edges), -1, dtype=torch.long), persistent=False)
        self.register_buffer("op_mask", torch.ones(2, num_edges, len(PRIMITIVES)), persistent=False)
        self._perturbed = False

    def _initialize_alphas(self):
        """DARTS' initialisation, drawn after the weights as DARTS draws it: small random logits, so that the
        mixture starts near uniform (PC-DARTS' edge logits too, with edge normalisation)."""
        num_edges = sum(2 + i for i in range(self._steps))
        names = ["alphas_normal", "alphas_reduce"]
        if self._options["edge_normalization"]:
            names += ["betas_normal", "betas_reduce"]
        self._arch_names = names
        for name in names:
            shape = (num_edges, len(PRIMITIVES)) if name.startswith("alphas") else (num_edges,)
            self._set_arch(name, 1e-3 * torch.randn(shape))

    def _set_arch(self, name: str, value: torch.Tensor):
        if self._options["register_arch_parameters"]:
            setattr(self, name, nn.Parameter(value))
        else:
            object.__setattr__(self, name, value.detach().requires_grad_())

    def _apply(self, fn, recurse=True):
        """Moves and casts the loose architecture tensors with the module (``.to()``, ``.double()``, ...), as
        leaves: nn.Module._apply only sees parameters and buffers."""
        super()._apply(fn, recurse)
        if not self._options["register_arch_parameters"]:
            for name in self._arch_names:
                old = getattr(self, name)
                with torch.no_grad():
                    new = fn(old)
                if new is not old:
                    self._set_arch(name, new)
        return self

    def new(self) -> "Network":
        """A network of the same configuration, on the same device and dtype, with a copy of the architecture
        parameters (and fresh weights): DARTS' Architect builds its unrolled model from it."""
        any_tensor = self.classifier.weight
        net = type(self)(self._C, self._num_classes, self._layers, self._criterion, self._steps, self._multiplier,
                         self._stem_multiplier, self._mixed_op, **self._options).to(any_tensor.device,
                                                                                    any_tensor.dtype)
        with torch.no_grad():
            for mine, theirs in zip(net.arch_parameters(), self.arch_parameters()):
                mine.copy_(theirs)
        return net

    def _loss(self, input, target):
        """DARTS' training loss: the criterion given at construction (cross-entropy when none was) of the logits."""
        logits = self(input)
        return (self._criterion or F.cross_entropy)(logits, target)

    def forward(self, input):
        if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
            raise TypeError(f"Network: `input` must be a floating-point tensor, got "
                            f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}")
        if input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(f"Network: `input` must be an (N, 3, H, W) image batch, got {tuple(input.shape)}")
        s0 = s1 = self.stem(input)
        weights = [self.cell_weights(reduction) for reduction in (False, True)]
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, *weights[cell.reduction])
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def cell_weights(self, reduction: bool):
        """(weights, index, edge_scale) for the normal or reduction cells, as Cell.forward takes them."""
        alpha = self.alphas_reduce if reduction else self.alphas_normal
        weights, index = edge_weights(alpha, self.weighting, self.tau)
        if self._perturbed:
            fixed = self.fixed_ops[int(reduction)]
            one_hot = F.one_hot(fixed.clamp(min=0), alpha.shape[1]).to(weights.dtype)
            weights = torch.where((fixed >= 0).unsqueeze(1), one_hot, weights) * self.op_mask[int(reduction)]
        if index is not None:
            index = index.tolist()
        beta = getattr(self, "betas_reduce" if reduction else "betas_normal", None)
        edge_scale = None if beta is None else node_edge_weights(beta, self._steps)
        return weights, index, edge_scale

    def arch_parameters(self) -> list[torch.Tensor]:
        """[alphas_normal, alphas_reduce] (then betas_normal, betas_reduce with edge normalisation), as DARTS'."""
        return [getattr(self, name) for name in self._arch_names]

    def weights_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the architecture's: what DARTS' weight optimiser steps."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> Genotype:
        """The discrete cell: per node, the 2 strongest incoming edges, each with its strongest operation
        other than 'none' (an edge's strength is its largest non-'none' weight, times its normalised edge
        weight with edge normalisation), as DARTS' and PC-DARTS' ``_parse``."""
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)  # a range, as DARTS' Genotype holds
        genes = []
        for reduction in (False, True):
            alpha = self.alphas_reduce if reduction else self.alphas_normal
            W = F.softmax(alpha.detach(), dim=-1)
            beta = getattr(self, "betas_reduce" if reduction else "betas_normal", None)
            if beta is not None:
                W = W * node_edge_weights(beta.detach(), self._steps).unsqueeze(1)
            genes.append(self._parse(W.tolist()))
        return Genotype(normal=genes[0], normal_concat=concat, reduce=genes[1], reduce_concat=concat)

    def _parse(self, weights: list[list[float]]) -> list[tuple[str, int]]:
        none = PRIMITIVES.index("none")
        candidates = [k for k in range(len(PRIMITIVES)) if k != none]
        gene = []
        start = 0
        for i in range(self._steps):
            W = weights[start:start + 2 + i]
            # sorted() is stable and max() keeps the first maximum: ties go to the lower index, as in DARTS.
            edges = sorted(range(2 + i), key=lambda j: -max(W[j][k] for k in candidates))[:2]
            for j in edges:
                k_best = max(candidates, key=lambda k: W[j][k])
                gene.append((PRIMITIVES[k_best], j))
            start += 2 + i
        return gene

    @torch.no_grad()
    def perturbation_genotype(self, loss_fn) -> Genotype:
        """DARTS-PT's selection (Wang et al., 2021, "Rethinking Architecture Selection in Differentiable NAS"):
        an operation's strength is how much the loss grows when it alone is masked out of the supernet.

        Edge by edge (normal cells, then reduction cells), each non-'none' op is masked in turn and
        ``loss_fn(self)`` (e.g. the validation loss on a fixed batch) evaluated; the op whose removal raises
        the loss most is kept and the edge fixed to it. Then, node by node, each incoming edge is masked in
        turn and the 2 whose removal raises the loss most are kept. DARTS-PT fine-tunes the supernet between
        decisions; call this on the tuned network, or drive ``fixed_ops`` / ``op_mask`` yourself to do so.
        The network is left with its edges fixed; ``reset_perturbation()`` undoes that.
        """
        none = PRIMITIVES.index("none")
        self._perturbed = True
        for cell_type in (0, 1):
            for e in range(self.fixed_ops.shape[1]):
                losses = {}
                for k in range(len(PRIMITIVES)):
                    if k == none:
                        continue
                    self.op_mask[cell_type, e, k] = 0
                    losses[k] = float(loss_fn(self))
                    self.op_mask[cell_type, e, k] = 1
                self.fixed_ops[cell_type, e] = max(losses, key=losses.get)
        genes = []
        for cell_type in (0, 1):
            gene, start = [], 0
            for i in range(self._steps):
                losses = {}
                for j in range(2 + i):
                    self.op_mask[cell_type, start + j] = 0
                    losses[j] = float(loss_fn(self))
                    self.op_mask[cell_type, start + j] = 1
                for j in sorted(losses, key=lambda j: -losses[j])[:2]:
                    gene.append((PRIMITIVES[int(self.fixed_ops[cell_type, start + j])], j))
                start += 2 + i
            genes.append(gene)
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)
        return Genotype(normal=genes[0], normal_concat=concat, reduce=genes[1], reduce_concat=concat)

    def reset_perturbation(self) -> None:
        """Back to the plain supernet: no edge fixed, nothing masked."""
        self.fixed_ops.fill_(-1)
        self.op_mask.fill_(1)
        self._perturbed = False
