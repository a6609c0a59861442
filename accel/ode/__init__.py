"""The ODE solvers over the fused step ops: accel.odeint (torchdiffeq's interface, and accel's per-sample control),
odeint_adjoint, odeint_event, and the local regularizer."""
from accel.ode.adjoint import odeint_adjoint
from accel.ode.local_regularizer import local_regularizer
from accel.ode.odeint import odeint, odeint_event

__all__ = ["local_regularizer", "odeint", "odeint_adjoint", "odeint_event"]
