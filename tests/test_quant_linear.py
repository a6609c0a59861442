"""accel.nn.QuantLinear, accel.quantize_ and distillation_loss: a 4-bit student distilled from its float teacher on
scikit-learn's digits stays within 2 points of the teacher; eval runs the packed kernels and agrees with the
fake-quantized training forward; quantize_ swaps Linears in place; pack() keeps only the codes."""
import copy

import pytest
import torch
from torch import nn

import accel
from accel.nn import QuantLinear, distillation_loss
from accel.ops import dequantize, quantize
from accel.reference import quant as reference

sklearn = pytest.importorskip("sklearn.datasets")


def digits():
    from sklearn.model_selection import train_test_split

    data = sklearn.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def fit(model, x, y, epochs, loss_fn, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            loss = loss_fn(model(x[batch]), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_four_bit_student_distilled_from_its_teacher_keeps_its_accuracy():
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = digits()
    teacher = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(teacher, x_train, y_train, 30, lambda out, b: nn.functional.cross_entropy(out, y_train[b]))
    student = nn.Sequential(QuantLinear.from_linear(teacher[0], bits=4, group_size=32), nn.ReLU(),
                            QuantLinear.from_linear(teacher[2], bits=4, group_size=32))
    teacher.eval()
    with torch.no_grad():
        soft = teacher(x_train)
    fit(student, x_train, y_train, 15, lambda out, b: distillation_loss(out, soft[b], y_train[b]), lr=1e-3)
    teacher_acc, student_acc = accuracy(teacher, x_test, y_test), accuracy(student, x_test, y_test)
    assert teacher_acc > 0.93
    assert student_acc >= teacher_acc - 0.02, f"student {student_acc:.3f}, teacher {teacher_acc:.3f}"


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32), (2, 64)])
def test_eval_runs_the_packed_product_and_matches_training(bits, group_size):
    layer = QuantLinear(96, 20, bits=bits, group_size=group_size)
    x = torch.randn(7, 96)
    train_out = layer.train()(x)
    eval_out = layer.eval()(x)
    # 8 bits: both use the same integer codes, so they agree to float rounding; weight-only: the same w_hat
    torch.testing.assert_close(eval_out, train_out, rtol=1e-4, atol=1e-4)
    w = layer.weight.detach().clone()
    layer.pack()
    assert layer.packed and layer.weight is None
    torch.testing.assert_close(layer(x), eval_out, rtol=0, atol=0)
    code_bytes = layer.weight_codes.numel() * layer.weight_codes.element_size()
    assert code_bytes * 8 == layer.weight_codes.shape[0] * quantize(w, bits, None if bits == 8 else group_size,
                                                                      layer.scheme).padded_features * bits


def test_straight_through_gradient_reaches_the_float_weights():
    layer = QuantLinear(64, 8, bits=4, group_size=32)
    x = torch.randn(5, 64)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(5, 8).T @ x)


def test_scale_gradient_reaches_the_weights_that_set_each_groups_range():
    torch.manual_seed(0)
    layer = QuantLinear(40, 8, bits=4, group_size=32, gradient="scale")  # 40 inputs: the second group is padded
    x = torch.randn(5, 40)
    layer(x).sum().backward()
    w = layer.weight.detach().double().requires_grad_()
    padded = torch.cat([w, w[:, -1:].expand(-1, 24)], dim=1)
    w_hat = reference.fake_quantize_through_scale(padded, 4, 32, "minmax")[:, :40]
    nn.functional.linear(x.double(), w_hat, layer.bias.double()).sum().backward()
    torch.testing.assert_close(layer.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(w.grad, torch.ones(5, 8, dtype=torch.float64).T @ x.double())


def test_quantize_swaps_linears_in_place_with_a_filter():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4)))
    reference = copy.deepcopy(model)
    accel.quantize_(model, bits=4, group_size=32, filter_fn=lambda m, name: name != "2.1")
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert type(model[2][1]) is nn.Linear
    x = torch.randn(3, 64)
    for m in (reference[0], reference[2][0]):
        m.weight.data = dequantize(quantize(m.weight.data, 4, 32, "minmax"))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`bits`"):
        QuantLinear(8, 8, bits=3)
    with pytest.raises(ValueError, match="`group_size`"):
        QuantLinear(8, 8, bits=4, group_size=20)
    with pytest.raises(ValueError, match="`gradient`"):
        QuantLinear(8, 8, gradient="truncated")
    with pytest.raises(ValueError, match="input features"):
        QuantLinear(8, 8)(torch.randn(2, 9))


def test_auto_bits_follow_the_hessian_and_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    with torch.no_grad():
        model[4].weight.mul_(4.0)
    x, y = torch.randn(256, 64), torch.randint(0, 8, (256,))
    calibration = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    traces = accel.nn.quant.hessian_traces(model, layers, calibration, probes=64)
    # the Hutchinson estimate against the exact trace of the last layer's Hessian
    w = model[4].weight
    exact = torch.autograd.functional.hessian(
        lambda w_: nn.functional.cross_entropy(nn.functional.linear(model[:4](x), w_, model[4].bias), y), w.detach())
    exact_trace = exact.reshape(w.numel(), w.numel()).diagonal().sum().item()
    assert abs(traces["4"] - exact_trace) < 0.15 * exact_trace
    # sensitivity per weight at 4 bits, HAWQ's Tr(H) / n * ||Q(W) - W||^2 / n
    sens = {n: traces[n] / m.weight.numel() ** 2 *
            (dequantize(quantize(m.weight.detach(), 4, 64, "minmax")) - m.weight.detach()).pow(2).sum().item()
            for n, m in layers.items()}
    accel.quantize_(model, bits="auto", budget=5.0, group_size=64, calibration=calibration)
    bits = {n: model[int(n)].bits for n in layers}
    sizes = {n: m.weight_codes.shape[0] * m.in_features for n, m in ((n, model[int(n)]) for n in layers)}
    assert set(bits.values()) <= {2, 4, 8} and len(set(bits.values())) > 1
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) <= 5.0
    assert bits[max(sens, key=sens.get)] >= bits[min(sens, key=sens.get)]
