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


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoints_load_both_ways(bits):
    float_model = mlp(0)
    x = torch.randn(5, 64)
    direct = accel.quantize_(copy.deepcopy(float_model), bits=bits, group_size=32)
    # a float checkpoint into a quantized model (another initialisation): quantized on load
    other = accel.quantize_(mlp(1), bits=bits, group_size=32)
    other.load_state_dict(float_model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), direct(x))
    # a quantized checkpoint round-trips, its keys the packed buffers
    keys = set(direct.state_dict())
    assert keys == {f"{i}.{name}" for i in (0, 2) for name in ("weight_codes", "weight_step", "weight_offset", "bias")}
    again = accel.quantize_(mlp(2), bits=bits, group_size=32)
    again.load_state_dict(direct.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), direct(x))
    # ... into unpacked QuantLinears (float weights): dequantized on load
    unpacked = nn.Sequential(QuantLinear(64, 32, bits=bits, group_size=32), nn.ReLU(),
                             QuantLinear(32, 8, bits=bits, group_size=32))
    unpacked.load_state_dict(direct.state_dict())
    for i in (0, 2):
        torch.testing.assert_close(unpacked[i].weight, direct[i].dequantized_weight(), rtol=0, atol=0)
    # ... and into the float model, through float_state_dict: the dequantized weights
    restored = mlp(3)
    restored.load_state_dict(accel.nn.float_state_dict(direct))
    for i in (0, 2):
        torch.testing.assert_close(restored[i].weight, direct[i].dequantized_weight(), rtol=0, atol=0)


def test_binary_checkpoints_load_both_ways():
    torch.manual_seed(4)
    latent = BinaryLinear(64, 8)
    packed = copy.deepcopy(latent).pack()
    fresh = BinaryLinear(64, 8).pack()
    fresh.load_state_dict(latent.state_dict())  # latent weights into a packed layer: packed on load
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), packed(x))
    unpacked = BinaryLinear(64, 8)
    unpacked.load_state_dict(packed.state_dict())  # packed into a latent one: sign(W) * scale
    torch.testing.assert_close(unpacked.weight, packed.dequantized_weight(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(unpacked.eval()(x), packed(x), rtol=1e-6, atol=1e-6)


def test_torchaos_config_objects_and_positional_filter():
    x = torch.randn(5, 64)
    for config, bits, group_size in ((accel.Int8DynamicActivationInt8WeightConfig(), 8, 128),
                                     (accel.Int4WeightOnlyConfig(group_size=32), 4, 32)):
        by_config = accel.quantize_(mlp(0), config, lambda m, name: name == "0")
        by_bits = accel.quantize_(mlp(0), bits=bits, group_size=group_size, filter_fn=lambda m, name: name == "0")
        assert isinstance(by_config[0], QuantLinear) and type(by_config[2]) is nn.Linear
        assert (by_config[0].bits, by_config[0].group_size) == (by_bits[0].bits, by_bits[0].group_size)
        with torch.no_grad():
            assert torch.equal(by_config(x), by_bits(x))
