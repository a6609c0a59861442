"""accel.nn.NeuralODE: the solution of accel.odeint (per_sample=True) at the end of t_span (and, in float64, of the
per-sample reference solver, accel/reference/ode.py), the regularizer left for the loss in training mode only, nn.Module
behaviour (state_dict, .to(), train/eval), and a few steps of training that fit a target map."""
import copy

import pytest
import torch
from torch import nn

import accel
from accel.nn import NeuralODE
from accel.reference import ode as reference


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


class Field(nn.Module):
    def __init__(self, d=2, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self, t, y):
        return self.net(y)


def test_forward_is_odeint_at_the_last_time_and_reports_nfe():
    torch.manual_seed(0)
    block = NeuralODE(Field(), t_span=(0.0, 0.5, 1.0))
    x = torch.randn(7, 2)
    with torch.no_grad():
        want, stats = accel.odeint(block.func, x, torch.tensor([0.0, 0.5, 1.0]), rtol=1e-6, atol=1e-8,
                                   per_sample=True, return_stats=True)
        assert torch.equal(block(x), want[-1])
    assert block.nfe == stats["nfe"]
    block.return_trajectory = True
    with torch.no_grad():
        assert torch.equal(block(x), want)
    # the parameters reach the solver: the gradients are odeint's (its discrete adjoint,
    # tests/test_odeint_per_sample.py)
    block.return_trajectory = False
    leaf = x.clone().requires_grad_()
    params = list(block.parameters())
    got = torch.autograd.grad(block(leaf).square().sum(), [leaf, *params])
    solution = accel.odeint(block.func, leaf, torch.tensor([0.0, 0.5, 1.0]), rtol=1e-6, atol=1e-8, per_sample=True)
    want = torch.autograd.grad(solution[-1].square().sum(), [leaf, *params])
    assert all(g.abs().max() > 0 and torch.equal(g, w) for g, w in zip(got, want))


def test_forward_in_float64_is_the_reference_solution():
    torch.manual_seed(3)
    # dense_output=False: the steps end on the output times, as the reference's do
    block = NeuralODE(Field(), t_span=(0.0, 0.5, 1.5), rtol=1e-7, atol=1e-9, return_trajectory=True,
                      dense_output=False).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        want, _ = reference.odeint(block.func, x, block.t_span, rtol=1e-7, atol=1e-9)
    # the reference takes the same steps (test_odeint_per_sample.py): the solutions agree to float64 rounding
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_regularization_loss_only_while_training():
    torch.manual_seed(1)
    block = NeuralODE(Field(), regularization="error", reg_weight=0.5)
    x = torch.randn(5, 2)
    block.train()
    block(x)
    loss = block.regularization_loss
    assert isinstance(loss, torch.Tensor) and loss.requires_grad and loss > 0
    _, reg = accel.odeint(block.func, x, torch.tensor([0.0, 1.0]), rtol=1e-6, atol=1e-8, per_sample=True,
                          regularization="error")
    torch.testing.assert_close(loss, 0.5 * reg.mean())
    block.eval()
    block(x)
    assert block.regularization_loss == 0.0


def test_behaves_like_a_module():
    block = NeuralODE(Field(), t_span=(0.0, 2.0), rtol=1e-5)
    state = block.state_dict()
    assert "t_span" in state and "func.net.0.weight" in state
    field64 = copy.deepcopy(block.func).double()
    double = NeuralODE(Field(), t_span=(0.0, 2.0), rtol=1e-5, dense_output=False).double()  # the reference's steps
    double.load_state_dict({k: v.double() for k, v in state.items()})
    assert double.t_span.dtype == torch.float64
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        out = double(x)
        # the loaded weights, in float64: the reference solver's solution with the first block's field
        want, _ = reference.odeint(field64, x, torch.tensor([0.0, 2.0], dtype=torch.float64), rtol=1e-5, atol=1e-8)
    assert out.dtype == torch.float64 and out.shape == (3, 2)
    torch.testing.assert_close(out, want[-1], rtol=1e-9, atol=1e-11)
    with pytest.raises(TypeError, match="`func` must be an nn.Module"):
        NeuralODE(lambda t, y: y)


def test_trains_to_fit_a_rotation():
    torch.manual_seed(2)
    block = NeuralODE(Field(hidden=32), rtol=1e-4, atol=1e-6)
    x = torch.randn(64, 2)
    angle = torch.tensor(0.8)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    target = x @ rotation.T
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = (block(x) - target).pow(2).mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
