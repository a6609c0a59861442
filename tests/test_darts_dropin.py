"""accel.nn.darts.Network as a drop-in for DARTS' search network (quark0/darts cnn/model_search.py): its positional
constructor, the architecture parameters kept outside parameters() and state_dict(), `_loss`, `new()`, the
genotype's ranges, strict checkpoints, and DARTS' Architect written out here (first order, and the unrolled
step's model rebuilt from a flat weight vector by a strict load)."""
import pytest
import torch
from torch import nn

from accel.nn.darts import Genotype, Network
from accel.reference import darts as reference

pytestmark = pytest.mark.usefixtures("one_thread")


def small(criterion=None, **kwargs):
    return Network(4, 10, 3, criterion, 2, 2, **kwargs)  # DARTS' positional order: C, classes, layers, criterion


def test_positional_constructor_and_criterion():
    criterion = nn.CrossEntropyLoss()
    net = small(criterion)
    assert net._criterion is criterion and net._steps == 2 and net._multiplier == 2
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    torch.testing.assert_close(net._loss(x, y), criterion(net(x), y), rtol=0, atol=0)
    with pytest.raises(TypeError, match="`criterion`"):
        Network(4, 10, 3, 2)  # accel's old positional `steps` in DARTS' criterion slot


def test_architecture_parameters_are_leaves_outside_parameters_and_checkpoints():
    net = small()
    alphas = net.arch_parameters()
    assert alphas == [net.alphas_normal, net.alphas_reduce]
    assert all(a.is_leaf and a.requires_grad and a.shape == (5, 8) for a in alphas)  # 2 + 3 edges, 8 primitives
    assert not any(p is a for p in net.parameters() for a in alphas)
    keys = list(net.state_dict())
    assert not any("alphas" in k or "betas" in k for k in keys)
    # DARTS' key layout, written out: stem, cells with preprocessing and mixed ops, classifier
    for key in ("stem.0.weight", "stem.1.running_mean", "cells.0.preprocess0.op.1.weight",
                "cells.2.preprocess0.conv_1.weight", "cells.0._ops.0._ops.4.op.1.weight",
                "cells.0._ops.0._ops.1.1.running_var", "classifier.weight", "classifier.bias"):
        assert key in keys, key
    pc = small(edge_normalization=True)
    assert pc.arch_parameters() == [pc.alphas_normal, pc.alphas_reduce, pc.betas_normal, pc.betas_reduce]


def test_architecture_parameters_follow_to_as_leaves():
    net = small().double()
    assert all(a.dtype == torch.float64 and a.is_leaf and a.requires_grad for a in net.arch_parameters())
    assert net.arch_parameters()[0] is net.alphas_normal
    net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert net.alphas_reduce.grad is not None and net.alphas_reduce.grad.abs().sum() > 0


def test_registered_architecture_parameters_are_parameters_and_state():
    net = small(register_arch_parameters=True)
    assert isinstance(net.alphas_normal, nn.Parameter)
    assert any(p is net.alphas_normal for p in net.parameters())
    assert {"alphas_normal", "alphas_reduce"} <= set(net.state_dict())


def test_same_seed_same_weights_as_the_eager_network():
    # The fused edges build their convolutions without consuming random draws of their own: a seed gives the
    # weights DARTS' network of plain modules gets.
    torch.manual_seed(5)
    fast = small()
    torch.manual_seed(5)
    eager = small(mixed_op=reference.MixedOp)
    for (k, a), b in zip(fast.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(fast.arch_parameters(), eager.arch_parameters()))


def test_new_copies_the_architecture_and_configuration():
    net = small(nn.CrossEntropyLoss(), edge_normalization=True).double()
    with torch.no_grad():
        net.alphas_normal.normal_()
    other = net.new()
    assert other is not net and other._criterion is net._criterion and other._steps == 2
    assert other.classifier.weight.dtype == torch.float64
    for a, b in zip(other.arch_parameters(), net.arch_parameters(), strict=True):
        assert torch.equal(a, b) and a is not b and a.is_leaf


def test_genotype_concat_is_a_range():
    g = Network(4, 10, 3).genotype()
    assert g.normal_concat == range(2, 6) and g.reduce_concat == range(2, 6)
    assert g == Genotype(g.normal, range(2, 6), g.reduce, range(2, 6))


def _concat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_darts_architect_steps_run_and_move_only_what_they_should():
    """DARTS' Architect.step, first order and unrolled, as architect.py writes it (float64)."""
    torch.manual_seed(0)
    net = small(nn.CrossEntropyLoss()).double()
    w_opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    xv, yv = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    eta = 0.025
    for unrolled in (False, True):
        weights_before = _concat(net.parameters()).detach().clone()
        alphas_before = _concat(net.arch_parameters()).detach().clone()
        a_opt.zero_grad()
        if not unrolled:
            net._loss(xv, yv).backward()
        else:
            # the unrolled model: theta - eta * (momentum + dtheta), loaded strictly into net.new()
            loss = net._loss(x, y)
            theta = _concat(net.parameters()).detach()
            dtheta = _concat(torch.autograd.grad(loss, list(net.parameters()))) + 3e-4 * theta
            unrolled_theta = theta - eta * dtheta
            model = net.new()
            state, offset = net.state_dict(), 0
            for name, p in net.named_parameters():
                state[name] = unrolled_theta[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            assert offset == theta.numel()
            model.load_state_dict(state, strict=True)
            model._loss(xv, yv).backward()
            for a, b in zip(net.arch_parameters(), model.arch_parameters()):
                a.grad = b.grad.clone()
        a_opt.step()
        # the weights are the weight optimiser's alone, the alphas the architecture optimiser's
        assert torch.equal(_concat(net.parameters()), weights_before)
        assert not torch.equal(_concat(net.arch_parameters()), alphas_before)
        w_opt.zero_grad()
        net._loss(x, y).backward()
        assert all(a.grad is None or torch.equal(a.grad, b) for a, b in
                   zip(net.arch_parameters(), [p.grad for p in net.arch_parameters()]))
        alphas_now = _concat(net.arch_parameters()).detach().clone()
        w_opt.step()
        assert torch.equal(_concat(net.arch_parameters()), alphas_now)
        assert not torch.equal(_concat(net.parameters()), weights_before)


def test_checkpoints_load_strictly_into_the_eager_network_and_back():
    fast, eager = small(), small(mixed_op=reference.MixedOp)
    fast.train()(torch.randn(2, 3, 8, 8))  # BatchNorm statistics move
    eager.load_state_dict(fast.state_dict(), strict=True)
    fast2 = small()
    fast2.load_state_dict(eager.state_dict(), strict=True)
    for (k, a), b in zip(fast.state_dict().items(), fast2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_pc_darts_names_and_defaults():
    """accel.nn.pc_darts under PC-DARTS' names: Network(C, num_classes, layers, criterion) with K = 4 partial
    channels and edge normalisation, its four architecture tensors in PC-DARTS' order, a Cell taking the edge
    weights as its fourth argument, and MixedOp(C, stride) on C / 4 channels."""
    from accel.nn import pc_darts

    net = pc_darts.Network(8, 10, 3, nn.CrossEntropyLoss())
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(14, 8), (14, 8), (14,), (14,)]
    assert net.arch_parameters()[2] is net.betas_normal and net.arch_parameters()[3] is net.betas_reduce
    assert all(a.is_leaf and a.requires_grad for a in net.arch_parameters())
    assert isinstance(net.new(), pc_darts.Network)
    edge = pc_darts.MixedOp(8, 1)
    convs = [m for m in edge.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.in_channels == 2 for m in convs)  # the candidates see C / K = 2 channels
    x = torch.randn(2, 8, 6, 6)
    assert edge(x, torch.full((8,), 1 / 8)).shape == x.shape
    cell = pc_darts.Cell(2, 2, 8, 8, 8, False, False)
    weights, weights2 = torch.full((5, 8), 1 / 8), torch.tensor([0.5, 0.5, 0.2, 0.3, 0.5])
    # the fourth argument scales each edge's output: all ones is no scaling, other values change the output
    torch.testing.assert_close(cell(x, x, weights, torch.ones(5)), cell(x, x, weights))
    assert not torch.allclose(cell(x, x, weights, weights2), cell(x, x, weights))
    assert net.genotype().normal_concat == range(2, 6)
