"""accel.nn.pooling: max and average pooling on channels-last copies give nn.MaxPool2d's and nn.AvgPool2d's
outputs and input gradients bit for bit, ties (exact zeros after a ReLU), NaN and Inf included."""
import pytest
import torch
from torch import nn

from accel.nn.pooling import AvgPool2d, MaxPool2d, use_channels_last_pooling

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(module, x, g):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(g)
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((8, 16, 17, 13), 3, 1, 1), ((8, 16, 17, 13), 3, 2, 1), ((4, 3, 8, 8), 2, 2, 0), ((2, 64, 9, 9), 3, 1, 1)])
def test_bit_identical_to_torch(dtype, shape, kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype).relu()  # many exact zeros: ties inside the windows
    x[0, 0, 2, 2], x[1, 1, 3, 3], x[1, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    for ours, theirs in ((MaxPool2d(kernel, stride, padding), nn.MaxPool2d(kernel, stride, padding)),
                         (AvgPool2d(kernel, stride, padding, count_include_pad=False),
                          nn.AvgPool2d(kernel, stride, padding, count_include_pad=False))):
        g = torch.randn(theirs(x).shape, dtype=dtype)
        want, want_grad = _run(theirs, x, g)
        got, got_grad = _run(ours, x, g)
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0, equal_nan=True)
    # a channel slice (not contiguous), as PC-DARTS' bypassed channels are
    sliced = x[:, 1:]
    g = torch.randn(nn.MaxPool2d(kernel, stride, padding)(sliced).shape, dtype=dtype)
    torch.testing.assert_close(_run(MaxPool2d(kernel, stride, padding), sliced, g),
                               _run(nn.MaxPool2d(kernel, stride, padding), sliced, g), rtol=0, atol=0, equal_nan=True)


def test_use_channels_last_pooling_swaps_in_place_and_keeps_the_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1), nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
                        nn.MaxPool2d(2, return_indices=True))
    keys = list(net.state_dict())
    assert use_channels_last_pooling(net) is net
    assert type(net[1]) is MaxPool2d and (net[1].kernel_size, net[1].stride, net[1].padding) == (3, 2, 1)
    assert type(net[2][0]) is AvgPool2d and net[2][0].count_include_pad is False
    assert type(net[3]) is nn.MaxPool2d  # with indices: left as it is
    assert list(net.state_dict()) == keys
