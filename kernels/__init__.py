"""Triton kernels for CUDA tensors (installed as accel.kernels); they also run under TRITON_INTERPRET=1."""
