"""Input checks shared by the ops: errors that name the argument and what was expected."""
import math

from torch import Tensor, nn

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


def is_real(value) -> bool:
    """Whether ``value`` is a finite Python number (not a bool, not a tensor: reading one would be a host sync)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(op: str, name: str, value, minimum: int = 1) -> None:
    """That ``value`` is an int >= minimum (a size, a count of steps or heads)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{op}: `{name}` must be an int >= {minimum}, got {value!r}")


def check_tolerances(op: str, rtol, atol) -> None:
    """The error tolerances of Hairer's norm: finite Python numbers >= 0, not both 0."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not is_real(value) or value < 0:
            raise ValueError(f"{op}: `{name}` must be a finite number >= 0 (Python floats: a tensor would cost a host "
                             f"sync to read), got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError(f"{op}: `rtol` and `atol` cannot both be 0")


def check_batch_norm(op: str, name: str, bn, channels: int, device, kind: str = "BatchNorm") -> None:
    """That ``bn`` is a BatchNorm(channels, affine=False) with running statistics on ``device``, a momentum in
    [0, 1] and an eps >= 0, as the fused batch-norm ops need (a negative eps makes 1 / sqrt(var + eps) NaN)."""
    if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.affine or not bn.track_running_stats
            or bn.num_features != channels or bn.momentum is None):
        raise ValueError(f"{op}: `{name}` must be a {kind}({channels}, affine=False) with running statistics and a "
                         f"momentum")
    if not (is_real(bn.momentum) and 0 <= bn.momentum <= 1 and is_real(bn.eps) and bn.eps >= 0):
        raise ValueError(f"{op}: `{name}` must have a momentum in [0, 1] and an eps >= 0, got momentum={bn.momentum}, "
                         f"eps={bn.eps}")
    if bn.running_mean.device != device:
        raise ValueError(f"{op}: `{name}`'s running statistics are on {bn.running_mean.device} but the input is on "
                         f"{device}")


def check_coefficients(op: str, name: str, values) -> None:
    """That ``values`` is a list or tuple of Python numbers (a row of a Butcher tableau)."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
        raise TypeError(f"{op}: `{name}` must be a list of floats, got {values!r}")
