"""accel.ops.pack_bits: sign bits packed 32 to an int32 word (accel/reference/binary.py), and its inverse.

Bit i of word w along ``dim`` is 1 where x[32 w + i] < 0, so 0 (and -0.0, and NaN) maps to +1; K is padded to a
multiple of 32 with 0 bits, which add nothing to binary_matmul's counts. Flow: pack_bits (checks, moves ``dim``
last) -> torch.ops.accel.pack_bits on (rows, K) -> C++ on the CPU (csrc/cpu/binary_matmul.cpp: AVX2 compares
and sign masks for float32), the PyTorch reference elsewhere. Not differentiable: the estimators of
accel.ops.binarize carry gradients through sign().
"""
import torch
from torch import Tensor

from accel.ops._library import lib, register_backends
from accel.reference import binary as reference

lib.define("pack_bits(Tensor x) -> Tensor")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pack_bits(x: Tensor, dim: int = -1) -> Tensor:
    """Packs sign(x) along ``dim``: (..., K, ...) float -> (..., ceil(K / 32), ...) int32."""
    if not isinstance(x, Tensor):
        raise TypeError(f"pack_bits: `x` must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"pack_bits: `x` must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("pack_bits: `x` must have at least one dimension")
    _check_dim("pack_bits", dim, x)
    moved = x.movedim(dim, -1)
    K = moved.shape[-1]
    packed = torch.ops.accel.pack_bits(moved.reshape(moved.shape[:-1].numel(), K))  # -1 is ambiguous when K = 0
    return packed.reshape(*moved.shape[:-1], reference.words(K)).movedim(-1, dim)


def unpack_bits(packed: Tensor, k: int, dim: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of pack_bits: (..., words, ...) int32 -> (..., k, ...) values in {-1, +1} of ``dtype``."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.int32:
        raise TypeError("unpack_bits: `packed` must be an int32 tensor from pack_bits")
    if packed.dim() == 0:
        raise ValueError("unpack_bits: `packed` must have at least one dimension")
    _check_dim("unpack_bits", dim, packed)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= packed.shape[dim] * reference.WORD_BITS:
        raise ValueError(f"unpack_bits: `k` must be an int in [0, {packed.shape[dim] * reference.WORD_BITS}], got {k!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unpack_bits: `dtype` must be a torch.dtype, got {dtype!r}")
    return reference.unpack_bits(packed, k, dim, dtype)


def _check_dim(op: str, dim, x: Tensor) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: `dim` must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")


def _reference_kernel(x):
    return reference.pack_bits(x)


@torch.library.register_fake("accel::pack_bits")
def _fake(x):
    return x.new_empty(x.shape[0], reference.words(x.shape[1]), dtype=torch.int32)


register_backends("pack_bits", _reference_kernel)
