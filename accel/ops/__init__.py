"""The public functional ops. Each defines its schema, fake kernel and autograd, and picks the backend."""
from accel.ops.mixed_op import mixed_op

__all__ = ["mixed_op"]
