"""accel.nn.BinaryLinear: a binary MLP trained with ReSTE on scikit-learn's digits reaches 90% test accuracy, and
its packed inference (popcount kernel) predicts exactly as the float path; loading from nn.Linear, pack(),
state_dict, compile."""
import pytest
import torch
from torch import nn

from accel.nn import BinaryLinear
from accel.reference.binary import sign

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


@pytest.mark.parametrize("scale", ["channel", "scalar", "none"])
def test_packed_forward_matches_the_float_formula(scale):
    layer = BinaryLinear(70, 33, scale=scale)
    x = torch.randn(5, 70)
    alpha = {"channel": layer.weight.abs().mean(1), "scalar": layer.weight.abs().mean(), "none": 1.0}[scale]
    expected = (sign(x.double()) @ sign(layer.weight.double()).T) * (alpha.double() if scale != "none" else 1.0) \
        + layer.bias.double()
    layer.eval()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-1)  # a changed weight is packed again
    torch.testing.assert_close(layer(x).double(), -expected + 2 * layer.bias.double(), rtol=1e-6, atol=1e-5)


def test_from_linear_pack_and_state_dict():
    linear = nn.Linear(100, 40)
    layer = BinaryLinear.from_linear(linear)
    torch.testing.assert_close(layer.weight, linear.weight)
    x = torch.randn(3, 100)
    expected = layer.eval()(x)
    layer.pack()
    assert layer.packed and layer.weight is None
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    state = layer.state_dict()
    assert state["weight_bits"].numel() * 4 * 8 == 40 * 128  # 1 bit per weight, K padded to 128
    with pytest.raises(RuntimeError, match="packed"):
        layer.train()


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
