"""The adaptive ODE solver over the fused step ops: accel.odeint."""
from accel.ode.odeint import odeint

__all__ = ["odeint"]
