"""accel.ops.rk_begin and rk_accept: the adaptive solver's per-sample step control, one call each per iteration
of accel.odeint with per_sample=True (before the stages, and after rk_finalize's error norm).

Flow: rk_begin / rk_accept -> torch.ops.accel.* -> C++ on the CPU (csrc/cpu/rk_control.cpp: one loop over the
batch), the PyTorch kernels below elsewhere (CUDA: a dozen (B,)-vector operations, no host sync). rk_accept
updates the solver's state in place. Neither is differentiable: step sizes and accept/reject decisions are
constants of the solver's backward (accel/ode/per_sample.py).

The rules, per sample (Hairer, Norsett and Wanner, Solving ODEs I, II.4; accel/reference/ode.py):
- the step is min(h, t_next - t), t_next the sample's next output time (or h, with dense output); 0 once the
  sample has passed the last output time;
- accepted when the error norm is <= 1 (always without a norm: fixed steps); the next step is
  step * clamp(safety * norm^(-1/q), 0.2, 10) (I controller) or, after the first accepted step,
  step * clamp(safety * norm^(-0.7/q) * previous^(0.4/q), 0.2, 10) (PI), at most the step after a rejection, and
  at least h after an accepted step that was shortened to end on an output time; a NaN norm rejects and takes
  the factor 0.2;
- on acceptance: t advances (to exactly t_next when the step ended there), y <- y1, the FSAL stage k[0] <- k[s-1],
  and y is written to the sample's output row when the step ended on its output time; with dense output, every
  output time the step passed gets the interpolant y + step sum_i b_i(theta) k_i (accel.reference.ode.interpolate).
"""
import torch
from torch import Tensor

from accel.ops._checks import CHECK_ERRORS, check_coefficients, check_count, not_a_tensor
from accel.ops._library import lib, register_backends

lib.define("rk_begin(Tensor t, Tensor h, Tensor next_index, Tensor times, float[] c, bool clip) -> (Tensor, Tensor)")
lib.define("rk_accept(Tensor(a!) y, Tensor(b!) k, Tensor(c!) t, Tensor(d!) h, Tensor(e!) next_index, "
           "Tensor(f!) previous, Tensor(g!) out, Tensor y1, Tensor? norm, Tensor step, Tensor times, float safety, "
           "int order, bool pi, bool fsal, float[]? interpolant) -> (Tensor, Tensor)")


_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64


def _times_fit(times, B) -> bool:
    """Output times shared by the batch (T,), or every sample's own (T, B)."""
    return times.dim() == 1 or (times.dim() == 2 and times.shape[1] == B)


def rk_begin(t: Tensor, h: Tensor, next_index: Tensor, times: Tensor, c, clip: bool = True) -> tuple[Tensor, Tensor]:
    """(step (B,), stage_times (s, B)): each sample's step from its time t (B,), step size h (B,) and next output
    row next_index (B,) int64 into times ((T,), or (T, B) per sample) (shortened to end on that output time when ``clip``), and its stage
    times t + c_i step for the tableau's nodes c."""
    # One combined test of attributes, as in rk_stage; _explain names what failed.
    try:
        dtype, device = t.dtype, t.device
        ok = (t.dim() == 1 and h.shape == t.shape and next_index.shape == t.shape and _times_fit(times, t.shape[0])
              and (dtype is _F32 or dtype is _F64) and h.dtype is dtype and times.dtype is dtype
              and next_index.dtype is _I64 and h.device == device and next_index.device == device
              and times.device == device and isinstance(c, (list, tuple)))
    except CHECK_ERRORS:
        ok = False
    if not ok:
        _explain("rk_begin", t, dict(t=t, h=h, next_index=next_index, times=times), dict(c=c))
    try:
        return torch.ops.accel.rk_begin(t, h, next_index, times, list(c), bool(clip))
    except (TypeError, RuntimeError):  # the schema's float[] refuses an element of c with a RuntimeError
        check_coefficients("rk_begin", "c", c)
        raise


def rk_accept(y, k, t, h, next_index, previous, out, y1, norm, step, times, safety: float, order: int, pi: bool,
              fsal: bool, interpolant=None) -> tuple[Tensor, Tensor]:
    """Accepts or rejects each sample's step and updates, in place: the state y (B, D), the stage buffer k
    (s, B, D) (FSAL), the times t, step sizes h, next output rows next_index, the PI controller's previous
    norms (0: none yet) and the outputs out (T, B, D). y1 is the step's solution, norm its error norms (None:
    fixed steps, always accepted), step what rk_begin returned, q = order the error estimator's order + 1;
    interpolant the tableau's dense-output rows (None: steps end on output times).
    Returns (status (B,) int8: 1 accepted, 0 rejected, -1 had finished; the number of unfinished samples)."""
    try:
        (B, D), (s, Bk, Dk), T = y.shape, k.shape, times.shape[0]
        dtype, device = y.dtype, y.device
        ok = ((dtype is _F32 or dtype is _F64) and s >= 1 and Bk == B and Dk == D and y1.shape == y.shape
              and _times_fit(times, B) and out.dim() == 3 and out.shape[0] >= T and out.shape[1:] == y.shape and next_index.shape == (B,)
              and next_index.dtype is _I64 and next_index.device == device and next_index.is_contiguous()
              and all(x.shape == (B,) for x in (t, h, previous, step))
              and (norm is None or norm.shape == (B,))
              and all(x.dtype is dtype and x.device == device and x.is_contiguous()
                      for x in (k, t, h, previous, out, y1, step, times, y if norm is None else norm))
              and isinstance(safety, (int, float)) and 0 < safety <= 1 and isinstance(order, int) and order >= 1)
    except CHECK_ERRORS:
        ok = False
    if not ok:
        vectors = dict(t=t, h=h, previous=previous, step=step) | ({} if norm is None else dict(norm=norm))
        _explain("rk_accept", y, dict(y=y, k=k, y1=y1, out=out, times=times, next_index=next_index, **vectors),
                 dict(safety=safety, order=order))
    flat = None
    if interpolant is not None:
        rows = list(interpolant) if isinstance(interpolant, (list, tuple)) else None
        if not rows or len(rows) != k.shape[0] or not all(isinstance(row, (list, tuple)) and len(row) == len(rows[0])
                                                          and len(row) >= 1 for row in rows):
            raise ValueError(f"rk_accept: `interpolant` must be {k.shape[0]} rows (one per stage of `k`) of equal "
                             f"length, or None, got {interpolant!r}")
        flat = [float(x) for row in rows for x in row]
    return torch.ops.accel.rk_accept(y, k, t, h, next_index, previous, out, y1, norm, step, times, float(safety),
                                     int(order), bool(pi), bool(fsal), flat)


def rk_begin_unchecked(t, h, next_index, times, c, clip: bool = True) -> tuple[Tensor, Tensor]:
    """rk_begin without its checks, for accel.odeint: its arguments are the solver's own, valid by construction, and
    at the solver's sizes checking a dozen tensors' attributes every iteration costs as much as the kernel."""
    return torch.ops.accel.rk_begin(t, h, next_index, times, list(c), bool(clip))


def rk_accept_unchecked(y, k, t, h, next_index, previous, out, y1, norm, step, times, safety, order, pi, fsal,
                        interpolant=None) -> tuple[Tensor, Tensor]:
    """rk_accept without its checks, for accel.odeint (see rk_begin_unchecked)."""
    flat = None if interpolant is None else [float(x) for row in interpolant for x in row]
    return torch.ops.accel.rk_accept(y, k, t, h, next_index, previous, out, y1, norm, step, times, float(safety),
                                     int(order), bool(pi), bool(fsal), flat)


def _explain(op: str, like: Tensor, tensors: dict, options: dict) -> None:
    """Raises the error that names what rk_begin's or rk_accept's combined check found wrong."""
    not_a_tensor(op, **tensors)
    like_name = next(iter(tensors))
    B = like.shape[0] if like.dim() >= 1 else "B"
    D = like.shape[1] if like.dim() == 2 else "D"
    T = tensors["times"].shape[0] if tensors["times"].dim() in (1, 2) else "T"
    times_shape = ("T", B) if tensors["times"].dim() == 2 else ("T",)
    shapes = {"y": (B, D), "y1": (B, D), "k": ("s >= 1", B, D), "out": (f">= {T}", B, D), "times": times_shape}
    for name, x in tensors.items():
        expected = shapes.get(name, (B,))
        fits = x.dim() == len(expected) and all(e == n for e, n in zip(expected, x.shape) if isinstance(e, int))
        if not fits or (name == "k" and x.shape[0] < 1) or (name == "out" and isinstance(T, int) and x.shape[0] < T):
            text = "(" + ", ".join(str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
            raise ValueError(f"{op}: `{name}` must have shape {text}, got {tuple(x.shape)}")
    for name, x in tensors.items():
        if name == "next_index" and x.dtype != _I64:
            raise TypeError(f"{op}: `next_index` must be int64, got {x.dtype}")
        if name != "next_index" and (x.dtype != like.dtype or x.dtype not in (_F32, _F64)):
            raise TypeError(f"{op}: `{name}` must be float32 or float64 like `{like_name}`, got {x.dtype}")
        if x.device != like.device:
            raise ValueError(f"{op}: `{name}` is on {x.device} but `{like_name}` is on {like.device}")
        if op == "rk_accept" and not x.is_contiguous():  # the CPU kernel updates them in place
            raise ValueError(f"{op}: `{name}` must be contiguous")
    if "c" in options:
        check_coefficients(op, "c", options["c"])
    if "safety" in options and not (isinstance(options["safety"], (int, float)) and 0 < options["safety"] <= 1):
        raise ValueError(f"{op}: `safety` must be a number in (0, 1], got {options['safety']!r}")
    if "order" in options:
        check_count(op, "order", options["order"])
    raise ValueError(f"{op}: invalid arguments")  # not reached


@torch.library.register_fake("accel::rk_begin")
def _begin_fake(t, h, next_index, times, c, clip):
    return t.new_empty(t.shape), t.new_empty(len(c), t.shape[0])


@torch.library.register_fake("accel::rk_accept")
def _accept_fake(y, k, t, h, next_index, previous, out, y1, norm, step, times, safety, order, pi, fsal, interpolant):
    return y.new_empty(y.shape[0], dtype=torch.int8), y.new_empty((), dtype=torch.long)


def _time_of_row(times, rows):
    """Each sample's output time at its row of times, (T,) shared or (T, B) per sample."""
    if times.dim() == 1:
        return times[rows]
    return times.gather(0, rows[None]).squeeze(0)


def _next_time(t, next_index, times):
    """The sample's next output time (its own time once it has passed the last one)."""
    T = times.shape[0]
    return torch.where(next_index < T, _time_of_row(times, next_index.clamp(max=T - 1)), t)


def _reference_begin(t, h, next_index, times, c, clip):
    remaining = _next_time(t, next_index, times) - t
    step = torch.where(h >= remaining, remaining, h) if clip else torch.where(next_index < times.shape[0], h, 0.0)
    c = torch.tensor(c, dtype=t.dtype, device=t.device)
    return step, t + c[:, None] * step


def _reference_accept(y, k, t, h, next_index, previous, out, y1, norm, step, times, safety, order, pi, fsal,
                      interpolant):
    T = times.shape[0]
    active = next_index < T
    t_next = _next_time(t, next_index, times)
    hit = (h >= t_next - t) & (interpolant is None)
    if norm is None:
        accept = active
    else:
        accept = active & (norm <= 1)
        n = norm.clamp_min(1e-10)
        factor = torch.where(previous > 0, safety * n.pow(-0.7 / order) * previous.pow(0.4 / order),
                             safety * n.pow(-1.0 / order))
        factor = torch.nan_to_num(factor, nan=0.2).clamp(0.2, 10.0)
        grown = torch.where(step < h, torch.maximum(h, step * factor), step * factor)
        h.copy_(torch.where(active, torch.where(accept, grown, torch.minimum(step * factor, step)), h))
        if pi:
            previous.copy_(torch.where(accept, n, previous))
    t_old = t.clone()
    t.copy_(torch.where(accept, torch.where(hit, t_next, t + step), t))
    if interpolant is not None:
        _interpolate_outputs(y, k, t_old, t, step, accept, next_index, out, times, interpolant)
    y.copy_(torch.where(accept[:, None], y1, y))
    if fsal:
        k[0] = torch.where(accept[:, None], k[-1], k[0])
    record = accept & hit
    samples = torch.arange(y.shape[0], device=y.device)
    rows = next_index.clamp(max=T - 1)  # the samples that record nothing write back what their row holds
    out[rows, samples] = torch.where(record[:, None], y, out[rows, samples])
    next_index.add_(record)
    status = torch.where(accept, 1, torch.where(active, 0, -1)).to(torch.int8)
    return status, (next_index < T).sum()


def interpolate_at(times, y, k, t_old, step, interpolant):
    """The dense output of each sample's step from (t_old, y) with stages k (s, B, D) and step (B,) at every time
    of times ((T,), or (T, B) per sample): (T, B, D), y + step sum_i b_i(theta) k_i with theta = (time - t_old) / step. Differentiable (the
    solver's backward goes through it)."""
    P = torch.tensor(interpolant, dtype=y.dtype, device=y.device).reshape(k.shape[0], -1)
    grid = times if times.dim() == 2 else times[:, None]
    theta = torch.where(step > 0, (grid - t_old) / torch.where(step > 0, step, 1.0), 1.0)  # (T, B)
    powers = torch.stack([theta ** (j + 1) for j in range(P.shape[1])], -1)  # (T, B, m)
    return y + step[:, None] * torch.einsum("tbm,sm,sbd->tbd", powers, P, k)


def _interpolate_outputs(y, k, t_old, t_new, step, accept, next_index, out, times, interpolant):
    """Writes the dense output at every output time each accepted step passed, and moves next_index past them."""
    rows = torch.arange(times.shape[0], device=y.device)[:, None]
    written = (rows >= next_index) & ((times if times.dim() == 2 else times[:, None]) <= t_new) & accept  # (T, B)
    out.copy_(torch.where(written[..., None], interpolate_at(times, y, k, t_old, step, interpolant), out))
    next_index.add_(written.sum(0))


register_backends("rk_begin", _reference_begin)
register_backends("rk_accept", _reference_accept)
