"""accel.nn.NeuralODE: a neural ODE block, y(t1) from y(t0) = x under dy/dt = func(t, y), solved by accel.odeint,
with the solver-heuristic regularizers of "Opening the Blackbox" (ERNODE, STRNODE) on request."""
import torch
from torch import Tensor, nn

from accel.ode import odeint
from accel.ode.per_sample import check_options
from accel.ops._checks import is_real

# accel.odeint's per-sample options that NeuralODE passes through, and those of them check_options knows
OPTIONS = ("controller", "safety", "first_step", "step_size", "min_step", "max_num_steps", "check_every", "params",
           "dense_output")
CHECKED_OPTIONS = ("controller", "safety", "first_step", "step_size", "min_step", "max_num_steps", "check_every")


class NeuralODE(nn.Module):
    """Maps x (B, D) to y(t_span[-1]) of dy/dt = func(t, y), y(t_span[0]) = x.

    Args:
        func: an nn.Module called as func(t, y), t the (B, 1) per-sample times (accel.odeint with
            per_sample=True); its parameters are trained through the solver (the discrete adjoint).
        t_span: (t0, t1), or more times: forward returns y at the last one (``return_trajectory`` for all).
        method, rtol, atol: passed to accel.odeint, with any other of its per-sample options in ``options``.
        regularization: None, 'error' (ERNODE) or 'stiffness' (STRNODE); while training, the batch mean of the
            regularizer times ``reg_weight`` is left in ``regularization_loss`` for the training loss to add
            (0 in eval mode, where the regularizer is not computed).
        return_trajectory: forward returns y at every time of t_span, (T, B, D).

    After each forward, ``nfe`` holds the solver's function evaluations.
    """

    def __init__(self, func: nn.Module, t_span=(0.0, 1.0), method: str = "dopri5", rtol: float = 1e-6,
                 atol: float = 1e-8, regularization: str | None = None, reg_weight: float = 0.0,
                 return_trajectory: bool = False, **options):
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"NeuralODE: `func` must be an nn.Module, got {type(func).__name__}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"NeuralODE: `{unknown[0]}` is not an option of accel.odeint; known: {OPTIONS}")
        check_options("NeuralODE", method, rtol, atol, regularization=regularization,
                      **{name: value for name, value in options.items() if name in CHECKED_OPTIONS})
        if not (is_real(reg_weight) and reg_weight >= 0):
            raise ValueError(f"NeuralODE: `reg_weight` must be a finite number >= 0, got {reg_weight!r}")
        t_span = torch.as_tensor(t_span, dtype=torch.get_default_dtype())
        if t_span.dim() != 1 or t_span.numel() < 2 or not bool(torch.isfinite(t_span).all()
                                                              & (t_span[1:] > t_span[:-1]).all()):
            raise ValueError(f"NeuralODE: `t_span` must be two or more finite, increasing times, got {t_span.tolist()}")
        self.func = func
        self.register_buffer("t_span", t_span)
        self.method, self.rtol, self.atol = method, rtol, atol
        self.regularization, self.reg_weight = regularization, float(reg_weight)
        self.return_trajectory, self.options = return_trajectory, options
        self.regularization_loss: Tensor | float = 0.0
        self.nfe = 0

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"NeuralODE: `x` must be a float32 or float64 tensor of shape (B, D) or (D,), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        regularize = self.training and self.regularization is not None
        results = odeint(self.func, x if x.dim() == 2 else x[None], self.t_span.to(x.dtype), method=self.method,
                         rtol=self.rtol, atol=self.atol, options=self.options, per_sample=True,
                         regularization=self.regularization if regularize else None, return_stats=True)
        ys, stats = results[0], results[-1]
        self.regularization_loss = self.reg_weight * results[1].mean() if regularize else 0.0
        self.nfe = stats["nfe"]
        ys = ys if x.dim() == 2 else ys[:, 0]
        return ys if self.return_trajectory else ys[-1]

    def extra_repr(self) -> str:
        return (f"t_span={tuple(self.t_span.tolist())}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
                f"regularization={self.regularization!r}, reg_weight={self.reg_weight}")
