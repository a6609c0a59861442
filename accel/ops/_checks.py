"""Input checks shared by the ops: errors that name the argument and what was expected."""
from torch import Tensor

# what a combined fast-path test of shapes and attributes may raise on a wrong argument; the op then explains
CHECK_ERRORS = (AttributeError, TypeError, ValueError)


def not_a_tensor(op: str, **arguments):
    """Raises the TypeError naming the first argument that is not a Tensor."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: `{name}` must be a Tensor, got {type(value).__name__}")


def check_tensor_list(op: str, name: str, ts: list, dtypes: tuple) -> Tensor:
    """That ``ts`` is a non-empty list of tensors of one shape, one device and one dtype among ``dtypes``;
    returns ``ts[0]``."""
    if not ts:
        raise ValueError(f"{op}: `{name}` must hold at least one tensor")
    allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes[:-1])
    allowed = f"{allowed} or {str(dtypes[-1]).replace('torch.', '')}" if allowed else str(dtypes[-1])
    t0 = ts[0]
    for k, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}[{k}]` must be a Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: `{name}[{k}]` must be {allowed}, got {t.dtype}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: `{name}[{k}]` has dtype {t.dtype} but `{name}[0]` has {t0.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{op}: `{name}[{k}]` is on {t.device} but `{name}[0]` is on {t0.device}")
        if t.shape != t0.shape:
            raise ValueError(f"{op}: `{name}[{k}]` has shape {tuple(t.shape)} but `{name}[0]` has {tuple(t0.shape)}")
    return t0
