"""Passing a list of tensors to a Triton kernel, which cannot take a list.

The kernel gets the first tensor as a base pointer and an int64 device tensor of element offsets,
tensor k living at ``base + offsets[k] * VEC``. This relies on one flat address space per device (true of
CUDA, and of host memory under TRITON_INTERPRET=1 with CPU tensors), as Triton's grouped-GEMM tutorial
relies on it with its table of pointers; Triton lowers pointer arithmetic to plain (not inbounds) GEPs, so
stepping out of the first tensor's allocation is well defined. The offsets are stored in units of VEC
elements, VEC = 16 bytes / element size when every offset allows it, so that Triton still knows each
pointer is 16-byte aligned and emits 128-bit loads.
"""
import torch


def in_layout(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """t itself when it has ``strides`` (a dense layout: empty_like's) and is element-aligned, else a
    copy in that layout."""
    if t.stride() == strides and t.data_ptr() % t.element_size() == 0:
        return t
    return t.new_empty_strided(t.shape, strides).copy_(t)


def addresses(ys: list[torch.Tensor], interpreted: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(base, offsets, VEC): ys[k] lives at base + offsets[k] * VEC elements.

    Under the interpreter (``interpreted``) every tensor argument is copied to the host on its own, so
    offsets between tensors off the host would not hold there: such tensors are first stacked into one.

    VEC is 16 bytes / element size when that divides every offset, else 1: then the kernels know that
    every branch keeps ys[0]'s 16-byte alignment, and keep their vectorised loads.
    """
    if interpreted and ys[0].device.type != "cpu":
        ys = list(_stacked(ys).unbind(0))
    element_size = ys[0].element_size()
    byte_offsets = [y.data_ptr() - ys[0].data_ptr() for y in ys]  # element multiples: see in_layout
    vec = 16 // element_size if all(b % 16 == 0 for b in byte_offsets) else 1
    offsets = torch.tensor([b // (element_size * vec) for b in byte_offsets], dtype=torch.int64)
    # non_blocking: a blocking host-to-device copy would synchronise the stream.
    return ys[0], offsets.to(ys[0].device, non_blocking=True), vec


def _stacked(ys: list[torch.Tensor]) -> torch.Tensor:
    """The ys copied into one (K, *shape) tensor: one argument, so the interpreter copies them together."""
    y0 = ys[0]
    stacked = y0.new_empty_strided((len(ys), *y0.shape), (max(y0.numel(), 1), *y0.stride()))
    for k, y in enumerate(ys):
        stacked[k].copy_(y)
    return stacked
