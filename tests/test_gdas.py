"""accel.nn.gdas.NASNetworkGDAS under GDAS' names (D-X-Y/AutoDL-Projects' NASNet search model): its constructor and
state_dict keys, (features, logits) from forward, one sampled operation per edge drawn by the hard gumbel-softmax,
the weights/alphas split of its two optimisers, and its genotype dict; written out here from that code's layout."""
import pytest
import torch
import torch.nn.functional as F

from accel.nn import DepthwiseConv2d
from accel.nn.gdas import DARTS_SPACE, NASNetworkGDAS

pytestmark = pytest.mark.usefixtures("one_thread")


def small(affine=False, stats=True):
    # C=4, N=1 (3 cells: normal, reduction, reduction), 2 nodes a cell, 10 classes
    return NASNetworkGDAS(4, 1, 2, 2, 3, 10, DARTS_SPACE, affine, stats)


def test_constructor_and_keys():
    net = small()
    sd = net.state_dict()
    assert list(sd)[:2] == ["arch_normal_parameters", "arch_reduce_parameters"]
    assert sd["arch_normal_parameters"].shape == (5, 8)  # 2 + 3 edges, 8 candidates
    # cell 0: stem of 12 channels into 4; its first edge's dual separable 3x3: depthwise, pointwise (with bias:
    # the BatchNorms are not affine), BatchNorm
    assert sd["cells.0.preprocess0.op.1.weight"].shape == (4, 12, 1, 1)
    assert sd["cells.0.preprocess0.op.1.bias"].shape == (4,)
    assert sd["cells.0.edges.0<-0._ops.2.op_a.op.1.weight"].shape == (4, 1, 3, 3)
    assert sd["cells.0.edges.0<-0._ops.2.op_b.op.2.weight"].shape == (4, 4, 1, 1)
    assert "cells.0.edges.0<-0._ops.2.op_b.op.3.running_mean" in sd
    assert sd["cells.0.edges.1<-2._ops.5.op.1.weight"].shape == (4, 1, 5, 5)  # dilated separable 5x5
    # after the reduction cell, the next cell's s0 is halved by a factorised reduce of two convolutions
    assert sd["cells.2.preprocess0.convs.0.weight"].shape == (8, 8, 1, 1)
    assert sd["cells.1.edges.0<-0._ops.1.convs.1.weight"].shape == (4, 8, 1, 1)  # skip at stride 2, 8 -> 8
    assert sd["lastact.0.weight"].shape == (32,) and sd["classifier.weight"].shape == (10, 32)
    assert not any(k.endswith("bias") and ".op.1." in k for k in small(affine=True).state_dict())
    assert not any("running_mean" in k and "edges" in k for k in small(stats=False).state_dict())
    assert isinstance(net.cells[0].edges["0<-0"]._ops[2].op_a.op[1], DepthwiseConv2d)
    fresh = small()
    fresh.load_state_dict(sd, strict=True)


def test_one_sampled_operation_per_edge():
    """forward draws gumbels for the normal then the reduction logits, runs each edge's sampled operation only,
    and gives it the straight-through weight: the sampled candidates' parameters get gradients, no other's."""
    net = small().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(7)
    indices = []
    for alpha in net.get_alphas():
        g = -torch.empty_like(alpha).exponential_().log()
        indices.append(F.softmax((alpha.log_softmax(1) + g) / net.get_tau(), dim=1).argmax(1).tolist())
    torch.manual_seed(7)
    features, logits = net(x)
    assert features.shape == (2, 32) and logits.shape == (2, 10)  # multiplier 2 x 4C
    logits.sum().backward()
    for cell in net.cells:
        index = indices[int(cell.reduction)]
        for key, edge in cell.edges.items():
            for k, op in enumerate(edge._ops):
                grads = [p.grad is not None for p in op.parameters()]
                assert all(grads) if k == index[cell.edge2index[key]] else not any(grads), (key, k)
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.get_alphas())


def test_weights_alphas_tau_and_genotype():
    net = small()
    alphas = {id(a) for a in net.get_alphas()}
    assert {id(p) for p in net.get_weights()} | alphas == {id(p) for p in net.parameters()}
    assert not alphas & {id(p) for p in net.get_weights()}
    assert net.get_tau() == 10
    net.set_tau(4.5)
    assert net.get_tau() == 4.5
    with torch.no_grad():
        net.arch_normal_parameters.zero_()
        net.arch_normal_parameters[3, DARTS_SPACE.index("max_pool_3x3")] = 5.0  # edge "1<-1"
        net.arch_normal_parameters[0, DARTS_SPACE.index("none")] = 9.0  # 'none' never enters the genotype
    genotype = net.genotype()
    assert genotype["normal_concat"] == [2, 3] and genotype["reduce_concat"] == [2, 3]
    first, second = genotype["normal"][1]  # node 1: the strongest (op, input, weight) over its 3 edges
    assert first[:2] == ("max_pool_3x3", 1)
    assert all(name != "none" for node in genotype["normal"] for name, _, _ in node)
    assert "arch-normal-parameters" in net.show_alphas()
