"""accel: fast fused kernels for the hot paths of recent research models, with readable references beside them."""
from accel import _extension
from accel import ops, reference

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__"]
