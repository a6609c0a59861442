"""Builds accel._C (csrc/cpu always, csrc/cuda when a CUDA build of torch and nvcc are present).

Switches (environment variables):
  ACCEL_FORCE_CUDA=1   build csrc/cuda even when torch cannot see a GPU (needs a CUDA build of torch and nvcc)
  ACCEL_NO_CUDA=1      never build csrc/cuda
  ACCEL_DEBUG=1        -O0 -g
  ACCEL_SANITIZE=1     build the C++ kernels with AddressSanitizer and UndefinedBehaviorSanitizer
  MAX_JOBS, TORCH_CUDA_ARCH_LIST are honoured by torch.utils.cpp_extension.
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda():
    if _flag("ACCEL_NO_CUDA"):
        return False
    has_toolkit = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if _flag("ACCEL_FORCE_CUDA"):
        if not has_toolkit:
            raise RuntimeError("ACCEL_FORCE_CUDA=1 needs a CUDA build of torch and nvcc")
        return True
    return bool(has_toolkit and torch.cuda.is_available())


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    sources = ["csrc/module.cpp"] + rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is an inline OpenMP region in the ATen headers; without it, it runs serially.
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if _flag("ACCEL_DEBUG"):
        cxx = ["-O0", "-g", "-std=c++17", "-fopenmp"]
    if _flag("ACCEL_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx += san
        ldflags += san
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        return CUDAExtension("accel._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx + ["-DACCEL_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=ldflags)
    return CppExtension("accel._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
