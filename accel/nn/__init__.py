"""Drop-in modules built on accel.ops."""
from accel.nn import darts, gdas, pc_darts
from accel.nn.binary import BinaryLinear
from accel.nn.depthwise_conv2d import DepthwiseConv2d, use_depthwise_kernels
from accel.nn.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from accel.nn.lssl import LSSL
from accel.nn.mixed_op import MixedOp
from accel.nn.neural_ode import NeuralODE
from accel.nn.packed_linear import float_state_dict
from accel.nn.pooling import use_channels_last_pooling
from accel.nn.quant import QuantLinear, distillation_loss, quantize_

__all__ = ["BinaryLinear", "DepthwiseConv2d", "Hopfield", "HopfieldLayer", "HopfieldPooling", "LSSL", "MixedOp",
           "NeuralODE", "QuantLinear", "darts", "distillation_loss", "float_state_dict", "gdas", "pc_darts", "quantize_",
           "use_channels_last_pooling", "use_depthwise_kernels"]
