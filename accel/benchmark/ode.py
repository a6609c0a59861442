"""Benchmark cases for `accel.odeint` and `accel.odeint_adjoint`, against torchdiffeq and torchode.

The problems:
- mlp_ode: Chen et al.'s neural ODE, as in "Opening the Blackbox" and "Locally Regularized NDEs": dy/dt = MLP(y)
  with MLP = Linear(D, 64) -> tanh -> Linear(64, D) (autonomous), y0 (B, D), from t = 0 to 1 by dopri5 at
  rtol = 1e-6, atol = 1e-8. D = 2 and 32 at B = 1, 256 and 4096 (two batch sweeps); --quick: D = 32, B = 64.
- mlp_ode_adjoint: the same at D = 32, B = 256, differentiated by the continuous adjoint on both sides.
- conv_ode: an ODE-Net block (Chen et al.; FFJORD's convolutional dynamics): dy/dt = conv(tanh(conv(y))) with 3x3
  convolutions of C channels, y0 (B, C, H, W), dopri5 at rtol = atol = 1e-3 (the ODE-Net example's tolerance).
Weights are float32 from a fixed seed. The output is the solution at t = 1; "fwd+bwd" differentiates a scalar of
it (the harness's fixed upstream gradient) w.r.t. y0 and the parameters.

Implementations, every one at the same method and tolerances:
- fast: ``accel.odeint(f, y0, t)`` (backpropagation through its steps), or ``accel.odeint_adjoint``.
- eager: ``torchdiffeq.odeint`` (backpropagation through its steps), or ``torchdiffeq.odeint_adjoint``. torch.compile
  of it is not timed (``compile=False``): an adaptive solver reads its error norm back to the host at every step,
  so compiling it breaks a graph per step and recompiles as step sizes change, which measures the compiler rather
  than the solver. Without torchdiffeq, the eager column is accel.reference.ode (a per-sample loop: only the MLP
  cases with B <= 64 are kept).
- torchode (peer, MLP cases): ``AutoDiffAdjoint(Dopri5, IntegralController)`` solving the batch in parallel,
  eager (not torch.jit.script), backpropagated through its steps; every sample has its own step size.
- accel_per_sample (peer, MLP cases): ``accel.odeint(..., per_sample=True)``, accel's per-sample control (every
  sample its own steps, the discrete adjoint): compare it with torchode.
``pip install accel[bench]`` installs torchdiffeq and torchode; a missing one is logged, never an error.

NFE: each implementation integrates its own counting wrapper of the one field. The case's ``info`` reports per
implementation "nfe" (calls of f in one forward, each a batched evaluation), "nfe_bwd" (calls made by the backward:
the adjoints and accel's discrete adjoint evaluate f again) and, where a solver evaluates only part of the batch,
"evals/sample". The default solvers (accel's and torchdiffeq's) control one step size for the whole state by one
RMS error norm; torchode and accel_per_sample run until their slowest sample ends.

Roofline: the field's FLOPs and bytes at the fast solver's forward NFE, counted once in ``setup``; the backward as
twice the forward. The Runge-Kutta combinations and the step control are left out: they are what a fast solver
should hide.
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

METHOD, HIDDEN = "dopri5", 64
MLP_TOL, CONV_TOL = (1e-6, 1e-8), (1e-3, 1e-3)
_LOOP_MAX_B = 64  # the largest batch for which accel.reference.ode's per-sample loop stands in as the eager solver


class Counted(nn.Module):
    """dy/dt = field(y), t ignored; counts its calls and the samples (rows) it evaluates."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.calls = self.rows = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += y.shape[0] if y.dim() else 1
        return self.field(y)


class Dynamics:
    """The ODE of a case on one device: the field, one counting wrapper of it per implementation, the tolerances,
    and the torchode solver objects (built once per wrapper, as a user would keep them)."""

    def __init__(self, field: nn.Module, names, eager_solver: str, tol: tuple):
        self.field = field
        self.f = {name: Counted(field) for name in names}
        self.eager_solver = eager_solver  # which solver the eager column is, for the report
        self.rtol, self.atol = tol
        self.torchode_solvers: dict = {}


# Each solver takes (f, y0, t, dyn) and returns y at t[-1].

def _solve_accel(f, y0, t, dyn):
    return accel.odeint(f, y0, t, method=METHOD, rtol=dyn.rtol, atol=dyn.atol)[-1]


def _solve_accel_adjoint(f, y0, t, dyn):
    return accel.odeint_adjoint(f, y0, t, method=METHOD, rtol=dyn.rtol, atol=dyn.atol)[-1]


def _solve_accel_per_sample(f, y0, t, dyn):
    return accel.odeint(f, y0, t, method=METHOD, rtol=dyn.rtol, atol=dyn.atol, per_sample=True)[-1]


def _solve_torchdiffeq(f, y0, t, dyn):
    import torchdiffeq

    return torchdiffeq.odeint(f, y0, t, method=METHOD, rtol=dyn.rtol, atol=dyn.atol)[-1]


def _solve_torchdiffeq_adjoint(f, y0, t, dyn):
    import torchdiffeq

    return torchdiffeq.odeint_adjoint(f, y0, t, method=METHOD, rtol=dyn.rtol, atol=dyn.atol)[-1]


def _solve_torchode(f, y0, t, dyn):
    import torchode as to

    solver = dyn.torchode_solvers.get(id(f))
    if solver is None:
        term = to.ODETerm(f, with_stats=False)  # NFE is counted by f itself
        controller = to.IntegralController(atol=dyn.atol, rtol=dyn.rtol, term=term)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), controller).to(y0.device)
        dyn.torchode_solvers[id(f)] = solver
    problem = to.InitialValueProblem(y0=y0, t_eval=t.repeat(y0.shape[0], 1))
    return solver.solve(problem).ys[:, -1]


def _solve_reference(f, y0, t, dyn):
    return reference.odeint(lambda t, y: f(t[:, None], y), y0, t, method=METHOD, rtol=dyn.rtol,
                            atol=dyn.atol)[0][-1]


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


def _forward_nfe(dyn: Dynamics, y0, t, solvers: dict) -> tuple[int, str | None]:
    """The fast solver's forward NFE (the eager one's if the fast one fails), for the roofline."""
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
    return nfe, source


def _mlp(D: int) -> nn.Module:
    return nn.Sequential(nn.Linear(D, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D))


class _ConvField(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, y):
        return self.conv2(torch.tanh(self.conv1(y)))


def _case(name: str, shape: tuple, field, work, tol: tuple, solvers: dict, eager_name: str, sweeps=()) -> Case:
    """A case solving dy/dt = field(y) from y0 of ``shape``; ``work(nfe)`` gives the forward's (flops, bytes)."""
    flops, nbytes = {"fwd": 0.0, "fwd+bwd": 0.0}, {"fwd": 0.0, "fwd+bwd": 0.0}
    params = {"shape": list(shape), "method": METHOD, "rtol": tol[0], "atol": tol[1], "eager": eager_name}

    def setup(device: torch.device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = field()
        module = module.to(device)
        y0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        t = torch.tensor([0.0, 1.0], device=device)
        dyn = Dynamics(module, solvers, eager_name, tol)
        nfe, source = _forward_nfe(dyn, y0, t, solvers)
        fwd_flops, fwd_bytes = work(nfe)
        flops.update({"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops})
        nbytes.update({"fwd": fwd_bytes, "fwd+bwd": 3 * fwd_bytes})
        params.update(roofline_nfe=nfe, roofline_nfe_of=source)
        return y0, t, list(module.parameters()), dyn

    return Case(
        name=name,
        op="ode",
        shape=f"y0 {tuple(shape)} t=0..1 {METHOD} rtol={tol[0]:g} atol={tol[1]:g}",
        setup=setup,
        fast=_impl("fast", solvers["fast"]),
        reference=_impl("eager", solvers["eager"]),
        peers={peer: _impl(peer, solve) for peer, solve in solvers.items() if peer not in ("fast", "eager")},
        bytes_moved=nbytes,
        flops=flops,
        size=4 * torch.Size(shape).numel(),
        sweeps=sweeps,
        params=params,
        compile=False,  # an adaptive solver syncs with the host every step: see the module's docstring
        info=_info,
    )


def _mlp_case(name, D, B, solvers, eager_name, sweeps=()) -> Case:
    def work(nfe):  # two matmuls per evaluation; the stage input and derivative, and the weights
        return nfe * 4 * B * D * HIDDEN, nfe * 4 * (2 * B * D + 2 * D * HIDDEN + HIDDEN + D)
    return _case(name, (B, D), lambda: _mlp(D), work, MLP_TOL, solvers, eager_name, sweeps)


def _conv_case(name, B, C, H, solvers, eager_name) -> Case:
    def work(nfe):  # two 3x3 convolutions per evaluation
        return nfe * 2 * 2 * B * C * C * 9 * H * H, nfe * 4 * (4 * B * C * H * H + 2 * C * C * 9)
    return _case(name, (B, C, H, H), lambda: _ConvField(C), work, CONV_TOL, solvers, eager_name)


def cases(quick: bool, device: torch.device) -> list[Case]:
    """MLP: D = 2 and 32 at B = 1, 256, 4096, and the adjoints at D = 32, B = 256; a conv block 16x16x16x16;
    --quick: the MLP at D = 32, B = 64."""
    have_torchdiffeq, have_torchode = _available("torchdiffeq"), _available("torchode")
    suffix = "_quick" if quick else ""
    if not have_torchdiffeq:
        _log.warning("accel bench: ode: without torchdiffeq the eager solver is accel.reference.ode, a per-sample "
                     "loop; only the MLP cases with B <= %d are kept", _LOOP_MAX_B)
    eager = ("torchdiffeq", _solve_torchdiffeq) if have_torchdiffeq else ("accel.reference.ode", _solve_reference)
    mlp_solvers = {"fast": _solve_accel, "eager": eager[1], "accel_per_sample": _solve_accel_per_sample}
    if have_torchode:
        mlp_solvers["torchode"] = _solve_torchode
    shapes = [(32, 64)] if quick else [(D, B) for D in (2, 32) for B in (1, 256, 4096)]
    if not have_torchdiffeq:
        shapes = [(D, B) for D, B in shapes if B <= _LOOP_MAX_B]
    out = [_mlp_case(f"mlp_ode{suffix} d={D} B={B}", D, B, mlp_solvers, eager[0], (f"batch, D={D}",))
           for D, B in shapes]
    if have_torchdiffeq and not quick:
        adjoint = {"fast": _solve_accel_adjoint, "eager": _solve_torchdiffeq_adjoint}
        out.append(_mlp_case("mlp_ode_adjoint d=32 B=256", 32, 256, adjoint, "torchdiffeq.odeint_adjoint"))
        conv = {"fast": _solve_accel, "eager": _solve_torchdiffeq}
        out.append(_conv_case("conv_ode B=16 C=16 16x16", 16, 16, 16, conv, "torchdiffeq"))
    return out
