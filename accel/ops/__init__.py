"""The public functional ops. Each defines its schema, fake kernel and autograd, and picks the backend."""
from accel.ops.batch_norm_mix import batch_norm_mix
from accel.ops.binarize import binarize
from accel.ops.binary_matmul import binary_linear, binary_matmul
from accel.ops.causal_conv import causal_conv
from accel.ops.darts_pool_branches import darts_pool_branches
from accel.ops.depthwise_conv2d import depthwise_conv2d
from accel.ops.hopfield_energy import hopfield_energy
from accel.ops.hopfield_update import hopfield_update
from accel.ops.krylov_kernel import krylov_kernel
from accel.ops.mixed_op import mixed_op
from accel.ops.pack_bits import pack_bits, unpack_bits
from accel.ops.quant_matmul import quant_matmul
from accel.ops.quantize import QuantizedWeight, dequantize, fake_quantize, quantize
from accel.ops.quantize_to_points import quantize_to_points
from accel.ops.rk_control import rk_accept, rk_begin
from accel.ops.rk_finalize import rk_finalize
from accel.ops.rk_stage import rk_stage

__all__ = ["QuantizedWeight", "batch_norm_mix", "binarize", "binary_linear", "binary_matmul", "causal_conv",
           "darts_pool_branches", "dequantize", "depthwise_conv2d", "fake_quantize", "hopfield_energy",
           "hopfield_update", "krylov_kernel", "mixed_op", "pack_bits", "quant_matmul", "quantize",
           "quantize_to_points", "unpack_bits"]
__all__ += ["rk_accept", "rk_begin", "rk_finalize", "rk_stage"]
