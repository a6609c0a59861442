"""``python -m accel info``: versions, CPU features, and which backend serves each op on each device."""
import os
import platform
import sys

import torch

from accel import _extension
from accel.ops import _library

CPU_FEATURES = ["avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "f16c", "bmi2"]


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model and which of the features the kernels care about it has (Linux; empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [feat for feat in CPU_FEATURES if feat in flags]


def int8_path(features: list[str]) -> str:
    """Which of the C++ int8 product's paths runs here (csrc/cpu/simd.h picks it the same way)."""
    if _extension.LOADED and {"avx512f", "avx512bw", "avx512_vnni"} <= set(features) and \
            os.environ.get("ACCEL_CPU_ISA") != "avx2":
        return "AVX-512 VNNI (vpdpbusd)"
    if {"avx2", "fma"} <= set(features):
        return "AVX2 (vpmaddubsw)"
    return "portable"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def ops() -> list[str]:
    """Every op in the accel namespace (forward and backward), by name."""
    import accel.ops  # noqa: F401  (defines them)

    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("accel::"))


def backend(op: str, key: str) -> str:
    """Which implementation the dispatcher runs for accel::<op> under dispatch key ``key`` (CPU, CUDA)."""
    lines = torch._C._dispatch_dump(f"accel::{op}").splitlines()
    for line in lines:
        if line.startswith(f"{key}:"):
            if ".py:" not in line:  # registered from csrc/ by accel._C
                return "C++ (accel._C)" if key == "CPU" else "CUDA (accel._C)"
            return "Triton" if key == "CUDA" and _library.triton_available() else "reference (PyTorch)"
    if any(line.startswith("CompositeExplicitAutograd") for line in lines):
        return "PyTorch (every device)"
    return "none"


def main(argv=None) -> int:
    import accel

    model, features = cpu_description()
    print(f"accel        {accel.__version__}")
    print(f"python       {sys.version.split()[0]}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton       {_version('triton')}")
    print(f"numpy        {_version('numpy')}")
    print(f"cpu          {model}; {torch.get_num_threads()} threads; features: {' '.join(features) or 'none known'}")
    print(f"int8 path    {int8_path(features)} (ACCEL_CPU_ISA=avx2 keeps to AVX2)")
    print(f"cuda device  {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    if _extension.LOADED:
        print("extension    accel._C loaded")
    else:
        print(f"extension    NOT loaded ({_extension.LOAD_ERROR}); rebuild: {_extension.REBUILD_COMMAND}")
    print("\nbackends:")
    for op in ops():
        cuda = backend(op, "CUDA") + ("" if torch.cuda.is_available() else " (no CUDA device here)")
        print(f"  {op:<30} cpu: {backend(op, 'CPU'):<22} cuda: {cuda}")
    from accel.nn.hopfield import REFERENCE_PATH
    print("\nreference path (PyTorch, the anchor's loop) for these module options, per call:")
    for option in REFERENCE_PATH:
        print(f"  Hopfield layers: {option}")
    return 0
