"""The torch.library namespace ``accel`` that every op's schema is defined in, and the backend choice."""
import importlib

import torch

from accel import _extension

lib = torch.library.Library("accel", "FRAGMENT")


def triton_available() -> bool:
    """Whether Triton kernels can run on CUDA tensors here."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register_backends(name: str, reference_impl, triton_impl=None) -> None:
    """Registers the kernels for accel::<name> that the C++ extension does not provide.

    CPU: the C++ kernel from accel._C, else ``reference_impl``. CUDA: the CUDA kernel from accel._C where it
    was built with one (csrc/cuda), else ``triton_impl`` when Triton is usable, else ``reference_impl``.
    """
    if not _extension.LOADED:
        lib.impl(name, reference_impl, "CPU")
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"accel::{name}", "CUDA"):
        return
    lib.impl(name, triton_impl if triton_impl is not None and triton_available() else reference_impl, "CUDA")


def triton_kernel(module: str, function: str):
    """accel.kernels.<module>.<function>, imported on its first call: Triton is loaded only when a CUDA tensor
    reaches the op."""
    def call(*args):
        return getattr(importlib.import_module(f"accel.kernels.{module}"), function)(*args)

    call.__name__ = f"{module}_{function}"
    return call


def eager_autograd(op, setup_context, backward):
    """A call of ``op`` (an OpOverload whose autograd is registered with these setup_context and backward) for
    ops the solver calls many times per step at small sizes, where the registered autograd kernel costs more than
    the kernel: ``call(needs_grad, *args)`` runs the kernel below the Autograd key when nothing is to be
    differentiated, else through an autograd.Function with the same setup_context and backward (about 30 us a
    call less than the registered autograd kernel, which is a second trip through the dispatcher and Python's
    argument filling). Under torch.compile the op is traced as usual, with its registered autograd."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(needs_grad: bool, *args):
        if torch.compiler.is_compiling():
            return op(*args)
        if needs_grad and torch.is_grad_enabled():
            return Function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call
