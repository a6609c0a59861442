"""The public functional ops. Each defines its schema, fake kernel and autograd, and picks the backend."""
from accel.ops.depthwise_conv2d import depthwise_conv2d
from accel.ops.mixed_op import mixed_op

__all__ = ["depthwise_conv2d", "mixed_op"]
