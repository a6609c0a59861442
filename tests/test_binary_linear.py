"""accel.nn.BinaryLinear: a binary MLP trained with ReSTE on scikit-learn's digits reaches 90% test accuracy, and
its packed inference (popcount kernel) predicts exactly as the float path; the packed forward and the training
forward and gradients against the layer's formula written with the reference estimators (accel/reference/
binary.py) by the numerics rule, the integer product exactly; loading from nn.Linear, pack(), state_dict,
compile."""
import pytest
import torch
from torch import nn

from accel.nn import BinaryLinear
from accel.reference import binary as reference
from accel.reference.binary import sign
from conftest import assert_by_rule


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

sklearn = pytest.importorskip("sklearn.datasets")


def digits():
    from sklearn.model_selection import train_test_split

    data = sklearn.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def binary_mlp():
    # The first layer sees real pixels (binary weights only); the others binarize their inputs too.
    return nn.Sequential(BinaryLinear(64, 256, binarize_input=False), nn.BatchNorm1d(256),
                         BinaryLinear(256, 256), nn.BatchNorm1d(256), BinaryLinear(256, 10), nn.BatchNorm1d(10))


def binary_layers(model):
    return [m for m in model if isinstance(m, BinaryLinear)]


def test_reste_mlp_learns_digits_and_packed_inference_agrees():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = binary_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    epochs = 40
    for epoch in range(epochs):
        for layer in binary_layers(model):
            layer.set_progress(epoch / (epochs - 1))
        model.train()
        for batch in torch.randperm(len(x_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert binary_layers(model)[0].o == pytest.approx(3.0)
    model.eval()
    with torch.no_grad():
        packed_logits = model(x_test)  # eval: the inner layers run on packed bits
        for layer in binary_layers(model):
            layer.train()  # the float path; the batch norms stay in eval
        float_logits = model(x_test)
    accuracy = (packed_logits.argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.90, f"test accuracy {accuracy:.3f}"
    assert torch.equal(packed_logits.argmax(1), float_logits.argmax(1))
    torch.testing.assert_close(packed_logits, float_logits, rtol=1e-5, atol=1e-5)


def layer_formula(layer: BinaryLinear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(sign(x) sign(W)^T) * scale + bias in x's dtype, written here from the reference: sign() with the
    reference's estimator of its gradient (a constant times the identity's gradient), the scale mean |W| per
    output row or of the whole matrix, differentiable."""
    grad_of_sign = {"ste": reference.ste_grad, "clipped": reference.clipped_ste_grad,
                    "reste": lambda v: reference.reste_grad(v, layer.o, layer.t, layer.delta)}[layer.estimator]

    def binarized(v):
        return sign(v).detach() + grad_of_sign(v.detach()) * (v - v.detach())

    y = (binarized(x) if layer.binarize_input else x) @ binarized(weight).T
    if layer.scale == "channel":
        y = y * weight.abs().mean(1)
    elif layer.scale == "scalar":
        y = y * weight.abs().mean()
    return y + bias


@pytest.mark.parametrize("scale", ["channel", "scalar", "none"])
def test_packed_forward_matches_the_float_formula(scale):
    layer = BinaryLinear(70, 33, scale=scale).eval()
    x = torch.randn(5, 70)

    def judged(what):
        w, b = layer.weight.detach(), layer.bias.detach()
        assert_by_rule(layer(x), layer_formula(layer, x, w, b), layer_formula(layer, x.double(), w.double(),
                                                                               b.double()), what)

    judged("packed forward")
    with torch.no_grad():
        layer.weight.mul_(-1)  # a changed weight is packed again
    judged("packed forward after the weight changed")


def test_packed_product_without_scale_and_bias_is_the_exact_integer_product():
    layer = BinaryLinear(300, 7, bias=False, scale="none").eval()  # 300 inputs: 10 words, the last one partial
    x = torch.randn(4, 300)
    assert torch.equal(layer(x).double(), sign(x.double()) @ sign(layer.weight.detach().double()).T)


@pytest.mark.parametrize("estimator, scale, binarize_input", [
    ("clipped", "channel", True), ("ste", "scalar", True), ("reste", "channel", True), ("reste", "none", False)])
def test_training_forward_and_gradients_follow_the_estimator(estimator, scale, binarize_input):
    layer = BinaryLinear(40, 6, estimator=estimator, scale=scale, binarize_input=binarize_input).train()
    layer.set_progress(0.6)  # ReSTE's power o between 1 and 3
    with torch.no_grad():
        layer.weight.mul_(30)  # latent weights on both sides of delta, 1 and t, where the estimators change
    x = torch.randn(9, 40) * 1.2
    g = torch.randn(9, 6)
    params = [layer.weight, layer.bias]
    got = [layer(x.requires_grad_())]
    got += list(torch.autograd.grad(got[0], [x, *params], g))
    runs = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *params)]
        out = layer_formula(layer, *leaves)
        runs.append([out] + list(torch.autograd.grad(out, leaves, g.to(dtype))))
    for name, f, r32, r64 in zip(["output", "grad of x", "grad of weight", "grad of bias"], got, *runs):
        assert r64.abs().max() > 0, name
        assert_by_rule(f.detach(), r32.detach(), r64.detach(), name)


def test_from_linear_pack_and_state_dict():
    linear = nn.Linear(100, 40)
    layer = BinaryLinear.from_linear(linear)
    torch.testing.assert_close(layer.weight, linear.weight)
    x = torch.randn(3, 100)
    expected = layer.eval()(x)
    expected_signs = linear.weight.detach() >= 0
    layer.pack()
    assert layer.packed and "weight" not in layer.state_dict()
    torch.testing.assert_close(layer.weight, torch.where(expected_signs, 1.0, -1.0) * layer.weight_scale[:, None],
                               rtol=0, atol=0)  # the signs times the scale, read and not kept
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    state = layer.state_dict()
    assert state["weight_bits"].numel() * 4 * 8 == 40 * 128  # 1 bit per weight, K padded to 128
    layer.train()  # the packed weights stay frozen in train mode: the same product
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_gradients_reach_latent_weights_and_compile():
    layer = BinaryLinear(20, 6, estimator="clipped")
    x = torch.randn(4, 20, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in (layer.weight, layer.bias)] + [x.grad.clone()]
    for t in (layer.weight, layer.bias, x):
        t.grad = None
    layer(x).sum().backward()
    for got, want in zip(grads, [layer.weight.grad, layer.bias.grad, x.grad]):
        torch.testing.assert_close(got, want)
    assert layer.weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="`estimator`"):
        BinaryLinear(4, 4, estimator="sigmoid")
    with pytest.raises(ValueError, match="`scale`"):
        BinaryLinear(4, 4, scale="row")
    with pytest.raises(ValueError, match="input features"):
        BinaryLinear(4, 4)(torch.randn(2, 5))
