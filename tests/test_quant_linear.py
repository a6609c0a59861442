"""accel.nn.QuantLinear, accel.quantize_ and distillation_loss: a 4-bit student distilled from its float teacher on
scikit-learn's digits stays within 2 points of the teacher; the eval (packed kernels) and training (fake-quantized)
forwards and the training gradients against the reference quantization (accel/reference/quant.py) by the numerics
rule; quantize_ swaps Linears in place; pack() keeps only the codes."""
import copy
import math

import pytest
import torch
from torch import nn

import accel
from accel.nn import QuantLinear, distillation_loss
from accel.ops import dequantize
from accel.reference import quant as reference
from conftest import assert_by_rule

sklearn = pytest.importorskip("sklearn.datasets")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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


def reference_codes(w: torch.Tensor, bits: int, group_size: int):
    """(codes, steps, offsets) of w (N, K) by the reference quantization as QuantLinear quantizes it: K padded to
    whole groups by repeating each row's last value (8 bits: one symmetric group per row of whole blocks of 32;
    4 and 2 bits: minmax groups of group_size)."""
    K = w.shape[1]
    G = 32 * math.ceil(K / 32) if bits == 8 else group_size
    padded = torch.cat([w, w[:, -1:].expand(-1, math.ceil(K / G) * G - K)], dim=1).double()
    return reference.quantize(padded, bits, G, "symmetric" if bits == 8 else "minmax")


def reference_weights(w: torch.Tensor, bits: int, group_size: int, dtype=torch.float64) -> torch.Tensor:
    """w_hat (N, K) in dtype, its steps and offsets rounded to dtype first (float32 is how the layer stores them)."""
    q, step, offset = reference_codes(w, bits, group_size)
    return reference.dequantize(q, step.to(dtype), offset.to(dtype)).to(dtype)[:, :w.shape[1]]


def reference_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, bits: int, group_size: int):
    """The quantized layer's output computed in x's dtype from the reference's codes; with 8 bits the activations
    are quantized per row too, in x's dtype, and the product of the codes is exact in float32 at these sizes."""
    if bits != 8:
        return x @ reference_weights(w, bits, group_size, x.dtype).T + bias
    q_w, step_w, _ = reference_codes(w, bits, group_size)
    step_x = x.abs().amax(1) / 127
    q_x = torch.round(x / step_x[:, None]).clamp(-127, 127)
    return (q_x @ q_w[:, :w.shape[1]].to(x.dtype).T) * step_x[:, None] * step_w[:, 0].to(x.dtype) + bias


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32), (2, 64)])
def test_eval_runs_the_packed_product_and_matches_training(bits, group_size):
    layer = QuantLinear(96, 20, bits=bits, group_size=group_size)
    x = torch.randn(7, 96)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    want32 = reference_forward(x, w, b, bits, group_size)
    want64 = reference_forward(x.double(), w.double(), b.double(), bits, group_size)
    if bits == 8:  # the activations' codes must be the same in float32 and float64 here: no rounding at a tie
        assert torch.equal(torch.round(x / (x.abs().amax(1, keepdim=True) / 127)),
                           torch.round(x.double() / (x.double().abs().amax(1, keepdim=True) / 127)).float())
    with torch.no_grad():
        train_out = layer.train()(x)
        eval_out = layer.eval()(x)
    assert_by_rule(train_out, want32, want64, "training forward (fake quantized)")
    assert_by_rule(eval_out, want32, want64, "eval forward (packed product)")
    layer.pack()
    assert layer.packed and "weight" not in layer.state_dict()
    torch.testing.assert_close(layer.weight, dequantize(layer.quantized_weight()), rtol=0, atol=0)  # read, not kept
    assert torch.equal(layer(x), eval_out)
    # the codes only: 96 inputs padded to whole groups (8 bits: 96, 4 bits: 96, 2 bits: 128) of `bits` bits each
    padded = {8: 96, 4: 96, 2: 128}[bits]
    assert layer.weight_codes.numel() * layer.weight_codes.element_size() == 20 * padded * bits // 8


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32)])
def test_straight_through_gradient_reaches_the_float_weights(bits, group_size):
    layer = QuantLinear(64, 8, bits=bits, group_size=group_size)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 8)
    gx, gw, gb = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], g)
    # straight through the weights' (and with 8 bits the activations') rounding: the gradients of
    # x_hat w_hat^T + b with respect to x_hat, w_hat and b
    w, x_ = layer.weight.detach(), x.detach()
    x_hat32 = x_ if bits != 8 else reference.fake_quantize(x_, 8, None, "symmetric")
    x_hat64 = x_.double() if bits != 8 else reference.dequantize(*reference.quantize(x_, 8, None, "symmetric"))
    assert_by_rule(gw, g.T @ x_hat32, g.double().T @ x_hat64, "grad of weight")
    assert_by_rule(gx, g @ reference_weights(w, bits, group_size, torch.float32),
                   g.double() @ reference_weights(w, bits, group_size), "grad of x")
    assert_by_rule(gb, g.sum(0), g.double().sum(0), "grad of bias")


def test_scale_gradient_reaches_the_weights_that_set_each_groups_range():
    torch.manual_seed(0)
    layer = QuantLinear(40, 8, bits=4, group_size=32, gradient="scale")  # 40 inputs: the second group is padded
    x = torch.randn(5, 40)
    g = torch.randn(5, 8)
    layer(x).backward(g)
    w = layer.weight.detach().double().requires_grad_()
    padded = torch.cat([w, w[:, -1:].expand(-1, 24)], dim=1)
    w_hat = reference.fake_quantize_through_scale(padded, 4, 32, "minmax")[:, :40]
    nn.functional.linear(x.double(), w_hat, layer.bias.double()).backward(g.double())
    # The reference computes in float64 only: its float32 error is taken as its rounding to float32 alone (the
    # least any float32 computation makes). Over 200 draws the error was at most 1.5e-7 of the gradient's scale.
    assert_by_rule(layer.weight.grad, w.grad.float(), w.grad, "grad of weight")
    assert not torch.allclose(w.grad, g.double().T @ x.double())  # not the straight-through gradient


def test_quantize_swaps_linears_in_place_with_a_filter():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4)))
    expected = copy.deepcopy(model)
    accel.quantize_(model, bits=4, group_size=32, filter_fn=lambda m, name: name != "2.1")
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert type(model[2][1]) is nn.Linear
    x = torch.randn(3, 64)
    for m in (expected[0], expected[2][0]):
        m.weight.data = reference_weights(m.weight.data, 4, 32, torch.float32)
    expected64 = copy.deepcopy(expected).double()
    with torch.no_grad():
        assert_by_rule(model(x), expected(x), expected64(x.double()), "quantized model")


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
            (reference.fake_quantize(m.weight.detach(), 4, 64, "minmax") - m.weight.detach()).pow(2).sum().item()
            for n, m in layers.items()}
    accel.quantize_(model, bits="auto", budget=5.0, group_size=64, calibration=calibration)
    bits = {n: model[int(n)].bits for n in layers}
    sizes = {n: m.weight_codes.shape[0] * m.in_features for n, m in ((n, model[int(n)]) for n in layers)}
    assert set(bits.values()) <= {2, 4, 8} and len(set(bits.values())) > 1
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) <= 5.0
    assert bits[max(sens, key=sens.get)] >= bits[min(sens, key=sens.get)]
