"""The adaptive ODE solver over the fused step ops: accel.odeint, and the local regularizer."""
from accel.ode.local_regularizer import local_regularizer
from accel.ode.odeint import odeint

__all__ = ["local_regularizer", "odeint"]
