"""Benchmark cases for `accel.odeint`: an MLP neural ODE integrated with dopri5, against torchdiffeq and torchode.

The problem (Chen et al.'s neural ODE, as in "Opening the Blackbox" and "Locally Regularized NDEs"): dy/dt = MLP(y)
with MLP = Linear(D, 64) -> tanh -> Linear(64, D) (autonomous, t is ignored), float32 weights from a fixed seed,
y0 (B, D) random normal from a fixed seed, integrated from t = 0 to t = 1 by dopri5 at rtol = 1e-6, atol = 1e-8.
The output is the solution at t = 1; "fwd+bwd" differentiates a scalar of it (the harness's fixed upstream
gradient) w.r.t. y0 and the MLP's parameters, by backpropagation through the solver's steps. D = 2 and 32 at
B = 1, 256 and 4096 (two batch sweeps); --quick: D = 32, B = 64.

Implementations, every one at the same method and tolerances:
- fast: ``accel.odeint(f, y0, t)`` (looked up when called, so the module imports before the solver exists).
- eager: torchdiffeq's dopri5, ``torchdiffeq.odeint(f, y0, t, method='dopri5', ...)``, backpropagated through
  its steps (not its adjoint). The harness needs an eager reference, and accel's own (accel.reference.ode) steps
  each sample on its own in a Python loop, far too slow at B = 256 and 4096; torchdiffeq is the eager code
  neural-ODE papers run. torch.compile of it is not timed (``compile=False``): an adaptive solver reads its
  error norm back to the host at every step, so compiling it breaks a graph per step and recompiles as step sizes
  change, which measures the compiler rather than the solver.
- torchode (peer): ``AutoDiffAdjoint(Dopri5, IntegralController)`` solving the batch in parallel, eager (not
  torch.jit.script), backpropagated through its steps.
- accel_batch_norm (peer): ``accel.odeint(f, y0, t, error_norm='batch')``, the fast solver under torchdiffeq's
  step control (see below).

The eager cell of the report names its solver ("solver torchdiffeq"). Without torchdiffeq the eager column is
torchode; without either, it is accel.reference.ode (and only the cases with B <= 64 are kept); a missing package
is logged, never an error. ``pip install accel[bench]`` installs both.

NFE: each implementation integrates its own counting wrapper of the one MLP, so every call of the vector field is
counted. The case's ``info`` reports per implementation "nfe" (calls of f in one forward, each a batched
evaluation), "nfe_bwd" (calls made by the backward: accel's discrete adjoint recomputes the stages; the
backprop-through-solver peers make none) and, where a solver evaluates only part of the batch, "evals/sample"
(rows evaluated / B). They are recorded in the JSON and printed beside each time in BENCHMARKS.md.
The NFEs are comparable but not equal by construction: accel and torchode control each sample's step on its own
error norm (the batch runs until its slowest sample ends), torchdiffeq takes one step size for the whole batch,
from the RMS error over all B x D elements. The peer accel_batch_norm is ``accel.odeint(..., error_norm='batch')``,
torchdiffeq's control (one norm over the batch), so it takes torchdiffeq's steps: compare it with the eager column.

Roofline: the MLP's FLOPs and bytes (stage inputs read, derivatives written, weights) at the fast solver's forward
NFE, counted once in ``setup`` (the eager solver's NFE if the fast one fails); the backward as twice the forward.
The Runge-Kutta combinations and the step control are left out: they are what a fast solver should hide.
"""
from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

import accel
from accel.benchmark.harness import Case, tensors_in
from accel.reference import ode as reference

_log = logging.getLogger(__name__)

METHOD, RTOL, ATOL, HIDDEN = "dopri5", 1e-6, 1e-8, 64
_LOOP_MAX_B = 64  # the largest batch for which accel.reference.ode's per-sample loop stands in as the eager solver


class CountedMLP(nn.Module):
    """dy/dt = MLP(y), t ignored; counts its calls and the rows (samples) it evaluates. Any t works: torchdiffeq
    passes a 0-dim time, torchode and accel.odeint one time per sample."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.calls = self.rows = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += y.shape[0]
        return self.mlp(y)


class Dynamics:
    """The ODE of a case on one device: the MLP, one counting wrapper of it per implementation, and the torchode
    solver objects (built once per wrapper, as a user would keep them)."""

    def __init__(self, mlp: nn.Module, names, eager_solver: str):
        self.mlp = mlp
        self.f = {name: CountedMLP(mlp) for name in names}
        self.eager_solver = eager_solver  # which solver the eager column is, for the report
        self.torchode_solvers: dict = {}


# Each solver takes (f, y0, t, dyn) and returns y at t[-1], (B, D).

def _solve_accel(f, y0, t, dyn):
    return accel.odeint(f, y0, t, method=METHOD, rtol=RTOL, atol=ATOL)[-1]


def _solve_accel_batch_norm(f, y0, t, dyn):
    return accel.odeint(f, y0, t, method=METHOD, rtol=RTOL, atol=ATOL, error_norm="batch")[-1]


def _solve_torchdiffeq(f, y0, t, dyn):
    import torchdiffeq

    return torchdiffeq.odeint(f, y0, t, method=METHOD, rtol=RTOL, atol=ATOL)[-1]


def _solve_torchode(f, y0, t, dyn):
    import torchode as to

    solver = dyn.torchode_solvers.get(id(f))
    if solver is None:
        term = to.ODETerm(f, with_stats=False)  # NFE is counted by f itself
        controller = to.IntegralController(atol=ATOL, rtol=RTOL, term=term)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), controller).to(y0.device)
        dyn.torchode_solvers[id(f)] = solver
    problem = to.InitialValueProblem(y0=y0, t_eval=t.repeat(y0.shape[0], 1))
    return solver.solve(problem).ys[:, -1]


def _solve_reference(f, y0, t, dyn):
    return reference.odeint(f, y0, t, method=METHOD, rtol=RTOL, atol=ATOL)[0][-1]


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency (torchode needs torchtyping and typeguard < 3)
        _log.warning("accel bench: ode: %s is not usable (%s: %s); install accel[bench] to time it",
                     module, type(exc).__name__, exc)
        return False
    return True


def _impl(name: str, solve):
    """The harness's callable for one implementation: it integrates that implementation's counting wrapper."""
    return lambda y0, t, params, dyn: solve(dyn.f[name], y0, t, dyn)


def _info(name: str, fn, inputs: tuple) -> dict:
    """NFE of one forward and of its backward, from the implementation's counting wrapper."""
    y0, dyn = inputs[0], inputs[3]
    f = dyn.f.get(name)
    if f is None:
        return {}
    f.calls = f.rows = 0
    out = fn(*inputs)
    calls, rows = f.calls, f.rows
    info = {"solver": dyn.eager_solver} if name == "eager" else {}
    info["nfe"] = calls
    if rows != calls * y0.shape[0]:
        info["evals/sample"] = round(rows / y0.shape[0], 1)
    leaves = [x for x in tensors_in(inputs) if x.requires_grad]
    if out.requires_grad and leaves:
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        info["nfe_bwd"] = f.calls - calls
    return info


def _set_work(flops: dict, nbytes: dict, params: dict, dyn: Dynamics, y0, t, solvers: dict) -> None:
    """The roofline's FLOPs and bytes at the fast solver's forward NFE (the eager one's if the fast one fails)."""
    nfe, source = 0, None
    for impl in ("fast", "eager"):
        try:
            with torch.no_grad():
                solvers[impl](dyn.f[impl], y0, t, dyn)
        except Exception:
            continue  # the harness reports the failure when it times this implementation
        nfe, source = dyn.f[impl].calls, impl
        break
    for f in dyn.f.values():
        f.calls = f.rows = 0
    B, D = y0.shape
    fwd_flops = nfe * 4 * B * D * HIDDEN  # two matmuls per evaluation
    fwd_bytes = nfe * 4 * (2 * B * D + 2 * D * HIDDEN + HIDDEN + D)  # stage input and derivative, weights
    flops.update({"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops})
    nbytes.update({"fwd": fwd_bytes, "fwd+bwd": 3 * fwd_bytes})
    params.update(roofline_nfe=nfe, roofline_nfe_of=source)


def _case(name: str, D: int, B: int, eager: tuple, peers: dict) -> Case:
    eager_name, eager_solve = eager
    solvers = {"fast": _solve_accel, "eager": eager_solve, **peers}
    # filled in by setup, once the solver's NFE is known (the harness reads them after setup)
    flops, nbytes = {"fwd": 0.0, "fwd+bwd": 0.0}, {"fwd": 0.0, "fwd+bwd": 0.0}
    params = {"B": B, "D": D, "hidden": HIDDEN, "method": METHOD, "rtol": RTOL, "atol": ATOL, "eager": eager_name}

    def setup(device: torch.device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D))
        mlp = mlp.to(device)
        y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        t = torch.tensor([0.0, 1.0], device=device)
        dyn = Dynamics(mlp, solvers, eager_name)
        _set_work(flops, nbytes, params, dyn, y0, t, solvers)
        return y0, t, list(mlp.parameters()), dyn

    return Case(
        name=name,
        op="ode",
        shape=f"B={B} D={D} hidden={HIDDEN} t=0..1 {METHOD} rtol={RTOL:g} atol={ATOL:g}",
        setup=setup,
        fast=_impl("fast", _solve_accel),
        reference=_impl("eager", eager_solve),
        peers={peer: _impl(peer, solve) for peer, solve in peers.items()},
        bytes_moved=nbytes,
        flops=flops,
        size=4 * B * D,
        sweeps=(f"batch, D={D}",),
        params=params,
        compile=False,  # an adaptive solver syncs with the host every step: see the module's docstring
        info=_info,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    """D = 2 and 32 at B = 1, 256, 4096; --quick: D = 32, B = 64."""
    have_torchdiffeq, have_torchode = _available("torchdiffeq"), _available("torchode")
    peers = {"accel_batch_norm": _solve_accel_batch_norm}
    if have_torchdiffeq:
        eager = ("torchdiffeq", _solve_torchdiffeq)
        if have_torchode:
            peers["torchode"] = _solve_torchode
    elif have_torchode:
        eager = ("torchode", _solve_torchode)
    else:
        eager = ("accel.reference.ode", _solve_reference)
    shapes = [(32, 64)] if quick else [(D, B) for D in (2, 32) for B in (1, 256, 4096)]
    if eager[0] == "accel.reference.ode":
        _log.warning("accel bench: ode: neither torchdiffeq nor torchode: the eager solver is accel.reference.ode, "
                     "a per-sample loop; only the cases with B <= %d are kept", _LOOP_MAX_B)
        shapes = [(D, B) for D, B in shapes if B <= _LOOP_MAX_B]
    return [_case(f"mlp_ode{'_quick' if quick else ''} d={D} B={B}", D, B, eager, peers) for D, B in shapes]
