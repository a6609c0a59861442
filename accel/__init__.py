"""accel: fast fused kernels for the hot paths of recent research models, with readable references beside them."""
from accel import _extension
from accel import ops, reference
from accel.nn.quant import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_
from accel.ode import odeint, odeint_adjoint, odeint_event

__version__ = "0.1.0"

__all__ = ["Int4WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "odeint", "odeint_adjoint", "odeint_event",
           "ops", "quantize_", "reference", "__version__"]
