"""Loads the compiled kernels (accel._C). When they cannot load, the ops run through the references."""
import warnings

import torch  # noqa: F401  (loads libtorch, which accel._C links against)

REBUILD_COMMAND = "pip install --no-build-isolation -e ."

try:
    from accel import _C  # noqa: F401  (importing registers the C++ kernels with the dispatcher)

    LOADED = True
    LOAD_ERROR = None
except ImportError as exc:  # missing, or built against another torch
    LOADED = False
    LOAD_ERROR = str(exc)
    warnings.warn(
        f"accel: the compiled extension accel._C could not be loaded ({exc}); ops run through the slow "
        f"PyTorch references. Rebuild it with: {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )
