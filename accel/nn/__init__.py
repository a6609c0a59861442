"""Drop-in modules built on accel.ops."""
