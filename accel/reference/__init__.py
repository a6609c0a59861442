"""Readable PyTorch references, one module per op, in each paper's notation: the source of truth for the fast ops.

Nothing here imports fast code. Example: ``from accel.reference.mixed_op import mixed_op``.
"""
