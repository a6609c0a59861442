"""Drop-in modules built on accel.ops."""
from accel.nn import darts
from accel.nn.mixed_op import MixedOp

__all__ = ["MixedOp", "darts"]
