"""Packed layers in real training set-ups: gradients through frozen packed weights (QuantLinear and BinaryLinear, in
eval and after pack()), a frozen quantized base with trainable low-rank adapters (QLoRA's recipe), train() on a
quantized model, and torch.compile(fullgraph=True) of every packed module with no graph break."""
import copy

import pytest
import torch
from torch import nn

import accel
from accel.nn import BinaryLinear, QuantLinear
from accel.ops import dequantize, unpack_bits


def quant_layer(bits):
    group_size = {8: 128, 4: 32, 2: 64}[bits]
    return QuantLinear(40, 8, bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_quantized_layer_passes_the_gradient_of_its_dequantized_weights(bits, packed):
    torch.manual_seed(bits)
    layer = quant_layer(bits).eval()
    if packed:
        layer.pack()
    x = torch.randn(3, 5, 40, requires_grad=True)
    g = torch.randn(3, 5, 8)
    grad_x, grad_bias = torch.autograd.grad(layer(x), [x, layer.bias], g)
    w_hat = dequantize(layer.quantized_weight())
    torch.testing.assert_close(grad_x, g @ w_hat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_bias, g.sum((0, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["ste", "clipped", "reste"])
def test_packed_binary_layer_passes_the_training_gradient_of_its_input(estimator):
    torch.manual_seed(0)
    layer = BinaryLinear(40, 8, estimator=estimator)
    layer.set_progress(0.5)
    x = torch.randn(5, 40, requires_grad=True)
    g = torch.randn(5, 8)
    want = torch.autograd.grad(layer.train()(x), [x, layer.bias], g)  # the weights' own gradient aside
    signs = unpack_bits(accel.ops.pack_bits(layer.weight.detach()), 40)
    assert torch.equal(signs, torch.where(layer.weight.detach() >= 0, 1.0, -1.0))
    for state in ("eval", "packed"):
        if state == "packed":
            layer.pack()
        got = torch.autograd.grad(layer.eval()(x), [x, layer.bias], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class LowRankAdapter(nn.Module):
    """y = base(x) + x A^T B^T: a frozen base and a trainable rank-r correction (LoRA)."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


class Dequantized(nn.Module):
    """A packed QuantLinear as a float product with its dequantized weights; at 8 bits the activations are
    quantized per row as the int8 product does, straight through."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.weight, self.bias, self.bits = dequantize(layer.quantized_weight()), layer.bias.detach(), layer.bits

    def forward(self, x):
        if self.bits == 8:
            rows = x.detach().reshape(-1, x.shape[-1])
            x = x + (dequantize(accel.ops.quantize(rows, 8)).reshape(x.shape) - x).detach()
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_quantized_base_with_trainable_adapters_trains(bits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    accel.quantize_(model, bits=bits, group_size=32)
    model[0], model[2] = LowRankAdapter(model[0]), LowRankAdapter(model[2])
    model.train()  # packed layers stay frozen in train mode
    adapters = [p for name, p in model.named_parameters() if name.endswith((".A", ".B"))]
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    # the same model with the dequantized weights in float products: the reference for the adapters' gradients
    twin = copy.deepcopy(model)
    for i in (0, 2):
        twin[i].base = Dequantized(twin[i].base)
    loss = nn.functional.mse_loss(model(x), target)
    grads = torch.autograd.grad(loss, adapters)
    twin_adapters = [p for name, p in twin.named_parameters() if name.endswith((".A", ".B"))]
    want = torch.autograd.grad(nn.functional.mse_loss(twin(x), target), twin_adapters)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    optimizer = torch.optim.Adam(adapters, lr=1e-2)
    first = loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first
    assert all(m.base.packed for m in (model[0], model[2]))  # the base stayed packed


def modules():
    return {"QuantLinear8": lambda: QuantLinear(64, 32, bits=8), "QuantLinear4": lambda: QuantLinear(64, 32, bits=4,
                                                                                                    group_size=32),
            "BinaryLinear": lambda: BinaryLinear(64, 32)}


@pytest.mark.parametrize("name", list(modules()))
@pytest.mark.parametrize("state", ["train", "eval", "packed", "float64", "loaded"])
def test_packed_modules_compile_as_one_graph(name, state):
    torch.manual_seed(2)
    layer = modules()[name]()
    dtype = torch.float64 if state == "float64" else torch.float32
    if state == "float64":
        layer = layer.to(dtype).eval()
    elif state == "loaded":
        fresh = modules()[name]()
        fresh.load_state_dict(layer.state_dict())
        layer = fresh.eval()
    elif state == "packed":
        layer.pack()
    else:
        layer.train(state == "train")
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    g = torch.randn(5, 32, dtype=dtype)
    got = compiled(x)
    want = layer(x)
    # compiled, the packing runs in the graph: the binary scale's mean may round differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad_got,) = torch.autograd.grad(got, x, g)
    (grad_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)


def encoder(batch_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bits, error", [(8, 0.01), (4, 0.08)])
def test_quantized_transformer_encoder_in_eager_and_compiled(batch_first, bits, error):
    """Every Linear, the attention's out_proj included, becomes a packed QuantLinear; torch's fused fast path
    steps aside for the packed products; eager and compiled agree; the output stays near the float model's."""
    torch.manual_seed(3)
    model = encoder(batch_first)
    reference = copy.deepcopy(model)
    accel.quantize_(model, bits=bits, group_size=32)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 6 and not any(type(m) is nn.Linear for m in model.modules())
    calls = []
    for m in quantized:
        m.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(3, 10, 64) if batch_first else torch.randn(10, 3, 64)
    with torch.no_grad():
        got = model(x)
        assert len(calls) == 4  # linear1 and linear2 of both layers; out_proj is read through its .weight
        want = reference(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert ((got - want).norm() / want.norm()) < error
    torch.testing.assert_close(compiled, got, rtol=1e-5, atol=1e-5)


def test_packed_weight_reads_as_the_dequantized_weights():
    layer = QuantLinear(64, 32, bits=4, group_size=32).pack()
    weight = layer.weight
    torch.testing.assert_close(weight, dequantize(layer.quantized_weight()), rtol=0, atol=0)
    assert type(weight @ weight.T) is torch.Tensor  # functions see through it
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
