"""accel.odeint_adjoint: torchdiffeq's continuous adjoint (Chen et al., "Neural Ordinary Differential Equations",
appendix B) on accel.odeint's default solver. The forward solves without recording anything; the backward solves
the augmented system from the last output time back to the first,

    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta,

adding each output's incoming gradient to the adjoint a when it passes that output time. Memory does not grow
with the number of steps, at the price of a second solve (the adjoint's) whose error is controlled separately.
Gradients with respect to the output times are attached as in accel.odeint.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from accel.ode.odeint import _Problem


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """accel.odeint's solution, differentiated by the continuous adjoint, as torchdiffeq.odeint_adjoint.

    ``adjoint_params``: the tensors func depends on that need gradients; by default func's parameters (func must
    then be an nn.Module). The adjoint solve uses ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method`` and
    ``adjoint_options`` (by default the forward's). Its error norm is the largest RMS over the state, the adjoint
    and each parameter's gradient (``adjoint_options['norm'] = 'seminorm'`` leaves the gradients out; a callable
    gets torchdiffeq's tuple: the time's adjoint (0 here: the times' gradients are attached directly), the state,
    its adjoint and the parameters' gradients, each in the user's shapes)."""
    op = "odeint_adjoint"
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(f"{op}: `func` must be an nn.Module when `adjoint_params` is not given")
        adjoint_params = tuple(func.parameters())
    adjoint_params = tuple(p for p in adjoint_params if isinstance(p, Tensor) and p.requires_grad)
    problem = _Problem(op, func, y0, t, rtol, atol, method, options, False, event_fn is not None)
    adjoint = _Problem(op, func, y0, t, problem.rtol if adjoint_rtol is None else adjoint_rtol,
                       problem.atol if adjoint_atol is None else adjoint_atol,
                       method if adjoint_method is None else adjoint_method,
                       dict(options or {}) if adjoint_options is None else
                       {k: v for k, v in adjoint_options.items() if k != "norm"}, False, False)
    adjoint_norm = None if adjoint_options is None else adjoint_options.get("norm")
    if event_fn is not None:  # find the event without a graph, then solve up to it as to an output time
        with torch.no_grad():
            solver = problem.flat_solver(problem.rtol, problem.atol, problem.options)
            s_event, _ = solver.solve(problem.state.flat, problem.times[:1], problem.event_function(event_fn))
        problem.times = adjoint.times = [problem.times[0], s_event]
        ys = _Adjoint.apply(problem, adjoint, adjoint_norm, problem.state.flat, *adjoint_params)
        return problem.event_result(event_fn, s_event, ys[-1])
    flat0 = problem.shifted_initial_state()
    ys = _Adjoint.apply(problem, adjoint, adjoint_norm, flat0, *adjoint_params)
    return problem.finish(ys)


class _Adjoint(torch.autograd.Function):

    @staticmethod
    def forward(ctx, problem, adjoint, adjoint_norm, flat0, *params):
        with torch.no_grad():
            ys = problem.flat_solver(problem.rtol, problem.atol, problem.options).solve(flat0, problem.times)
        ctx.problem, ctx.adjoint, ctx.adjoint_norm = problem, adjoint, adjoint_norm
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        problem, adjoint = ctx.problem, ctx.adjoint
        ys, *params = ctx.saved_tensors
        N = ys.shape[-1]
        sizes = [N, N] + [p.numel() for p in params]

        def augmented(s, z, nudge):
            """d/ds of (y, a, g) in the adjoint solver's time s, which runs against the forward's."""
            y, a = z[:, :N], z[:, N:2 * N]
            with torch.enable_grad():
                y = y.detach().requires_grad_()
                f = problem.call(-s, y, -nudge)
                vjps = torch.autograd.grad(f, (y, *params), a, allow_unused=True) if f.requires_grad else \
                    (None,) * (1 + len(params))
            vjps = [torch.zeros_like(x) if v is None else v for v, x in zip(vjps, (y, *params))]
            return torch.cat([-f.detach(), *(v.reshape(1, -1) for v in vjps)], 1)

        def norm(x: Tensor) -> Tensor:
            parts = x.split(sizes, -1)
            if callable(ctx.adjoint_norm):
                y, a = (problem.state.unflatten(part) for part in parts[:2])
                y, a = (y, a) if problem.state.is_tuple else ((y,), (a,))
                grads = (g.reshape(p.shape) for g, p in zip(parts[2:], params))
                return ctx.adjoint_norm((x.new_zeros(()), *y, *a, *grads))
            parts = parts[:2] if ctx.adjoint_norm == "seminorm" else parts
            return torch.stack([p.pow(2).mean().sqrt() for p in parts if p.numel()]).max()

        solver = adjoint.flat_solver(adjoint.rtol, adjoint.atol, adjoint.options, func=augmented, norm=norm,
                                     backward=True)
        a = grad_ys[-1].clone()
        grads = [torch.zeros(1, p.numel(), dtype=ys.dtype, device=ys.device) for p in params]
        times = problem.times
        for i in range(len(times) - 1, 0, -1):
            z = torch.cat([ys[i], a, *grads], 1)
            z = solver.solve(z, [-times[i], -times[i - 1]])[-1]
            a = z[:, N:2 * N] + grad_ys[i - 1]
            grads = [g.reshape(1, -1) for g in z[:, 2 * N:].split(sizes[2:], 1)]
        if len(times) == 1:
            a = grad_ys[0]
        return (None, None, None, a, *(g.reshape(p.shape).to(p.dtype) for g, p in zip(grads, params)))
