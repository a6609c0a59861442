"""accel.ops.binary_matmul: products of sign matrices packed by pack_bits, as exact integers, with the
epilogue of a binary layer fused (accel/reference/binary.py).

For a (M, K) and b (N, K) packed along K, out[m, n] = K - 2 popcount(a_m XOR b_n) = sign(a_m) . sign(b_n);
with ``scale`` ((N,) per output channel, as XNOR-Net's alpha = mean |W| per row, or a single number) and ``bias``
(N,) fused: out * scale + bias in float32. `binary_linear` takes float activations and binarizes and packs them
on the fly.

Flow: binary_matmul (checks) -> torch.ops.accel.binary_matmul -> C++ on the CPU (csrc/cpu/binary_matmul.cpp:
register tiles of XOR + POPCNT), a Triton kernel on CUDA (kernels/binary_matmul.py), the reference elsewhere.
Not differentiable (integer operands): training runs through accel.ops.binarize and float products, and
accel.nn.BinaryLinear switches to this op for inference.
"""
import torch
from torch import Tensor

from accel.ops._library import lib, register_backends, triton_kernel
from accel.ops.pack_bits import pack_bits
from accel.reference import binary as reference

lib.define("binary_matmul(Tensor a, Tensor b, int k, Tensor? scale, Tensor? bias) -> Tensor")

OUTPUTS = ("int", "float", "bits")


def binary_matmul(a_bits: Tensor, b_bits: Tensor, k: int, *, scale: Tensor | float | None = None,
                  bias: Tensor | None = None, output: str | None = None) -> Tensor:
    """sign(a) sign(b)^T from packed operands.

    Args:
        a_bits: (..., W) int32, rows of K bits packed by pack_bits (W = ceil(K / 32)). The bits past k in the
            last word must be 0, as pack_bits leaves them: they are counted like the others.
        b_bits: (N, W) int32, e.g. a Linear layer's (out_features, in_features) weight, packed.
        k: K, the number of bits per row that count.
        scale: (N,) per output channel, or a number; multiplies the dot products.
        bias: (N,), added after the scale.
        output: "int" (the exact int32 dot products; not with scale or bias), "float" (float32), or "bits" (the
            signs of the float result packed along N, the input of a next binary layer). Default: "int" without
            scale and bias, else "float".

    Returns (..., N).
    """
    op = "binary_matmul"
    for name, t in (("a_bits", a_bits), ("b_bits", b_bits)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{op}: `{name}` must be an int32 tensor of packed bits (pack_bits)")
    if a_bits.dim() < 1 or b_bits.dim() != 2:
        raise ValueError(f"{op}: `a_bits` must be (..., W) and `b_bits` (N, W), got shapes {tuple(a_bits.shape)} "
                         f"and {tuple(b_bits.shape)}")
    if a_bits.device != b_bits.device:
        raise ValueError(f"{op}: `b_bits` is on {b_bits.device} but `a_bits` is on {a_bits.device}")
    W = a_bits.shape[-1]
    if b_bits.shape[1] != W:
        raise ValueError(f"{op}: `a_bits` has {W} words per row but `b_bits` has {b_bits.shape[1]}")
    if not isinstance(k, int) or isinstance(k, bool) or reference.words(k) != W:
        raise ValueError(f"{op}: `k` must be an int with ceil(k / 32) = {W} (the operands' words), got {k!r}")
    N = b_bits.shape[0]
    if output is None:
        output = "int" if scale is None and bias is None else "float"
    if output not in OUTPUTS:
        raise ValueError(f"{op}: `output` must be one of {OUTPUTS}, got {output!r}")
    if output == "int" and (scale is not None or bias is not None):
        raise ValueError(f"{op}: `output` must be 'float' or 'bits' with `scale` or `bias`: `output='int'` gives the "
                         f"exact dot products")
    scale = _vector(op, "scale", scale, N, a_bits.device, allow_number=True)
    bias = _vector(op, "bias", bias, N, a_bits.device, allow_number=False)
    if output != "int" and scale is None and bias is None:
        scale = torch.ones(1, device=a_bits.device)
    out = torch.ops.accel.binary_matmul(a_bits.reshape(a_bits.shape[:-1].numel(), W), b_bits, k, scale, bias)
    out = out.reshape(*a_bits.shape[:-1], N)
    return pack_bits(out) if output == "bits" else out


def binary_linear(x: Tensor, w_bits: Tensor, k: int | None = None, *, scale: Tensor | float | None = None,
                  bias: Tensor | None = None) -> Tensor:
    """sign(x) sign(W)^T * scale + bias in float32 for float activations x (..., K): x is binarized and packed on
    the fly (pack_bits), then binary_matmul. w_bits: (N, ceil(K / 32)) packed weight rows."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError("binary_linear: `x` must be a floating-point tensor (..., K)")
    if x.dim() == 0:
        raise ValueError("binary_linear: `x` must have shape (..., K), got a 0-dim tensor")
    k = x.shape[-1] if k is None else k
    if x.shape[-1] != k:
        raise ValueError(f"binary_linear: `x` must have {k} features in its last dimension, got {tuple(x.shape)}")
    # binary_matmul would name its own arguments; here the weight is `w_bits`
    if not isinstance(w_bits, Tensor) or w_bits.dtype != torch.int32:
        raise TypeError("binary_linear: `w_bits` must be an int32 tensor of packed bits (pack_bits)")
    if w_bits.dim() != 2 or w_bits.shape[1] != reference.words(k):
        raise ValueError(f"binary_linear: `w_bits` must have shape (N, {reference.words(k)}) for K = {k}, got "
                         f"{tuple(w_bits.shape)}")
    if w_bits.device != x.device:
        raise ValueError(f"binary_linear: `w_bits` is on {w_bits.device} but `x` is on {x.device}")
    return binary_matmul(pack_bits(x), w_bits, k, scale=scale, bias=bias, output="float")


def _vector(op, name, value, N, device, allow_number):
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and allow_number:
        return torch.tensor([float(value)], device=device)
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor" + (" or a number" if allow_number else ""))
    if value.device != device:
        raise ValueError(f"{op}: `{name}` is on {value.device} but `a_bits` is on {device}")
    if not (value.shape == (N,) or (allow_number and value.numel() == 1)):
        raise ValueError(f"{op}: `{name}` must have shape ({N},)" + (" or one element" if allow_number else "") +
                         f", got {tuple(value.shape)}")
    return value.detach().reshape(-1).float()


def _reference_kernel(a, b, k, scale, bias):
    """Unpacks and multiplies in float64: exact for any K below 2^53."""
    dots = reference.unpack_bits(a, k, dtype=torch.float64) @ reference.unpack_bits(b, k, dtype=torch.float64).T
    if scale is None and bias is None:
        return dots.to(torch.int32)
    out = dots.float()
    if scale is not None:
        out = out * scale
    if bias is not None:
        out = out + bias
    return out


@torch.library.register_fake("accel::binary_matmul")
def _fake(a, b, k, scale, bias):
    dtype = torch.int32 if scale is None and bias is None else torch.float32
    return a.new_empty(a.shape[0], b.shape[0], dtype=dtype)


register_backends("binary_matmul", _reference_kernel, triton_kernel("binary_matmul", "forward"))
