"""The peers of the low-bit Linear benchmarks (binary_matmul, quant_matmul): the layers a low-bit one replaces.

`float32` is the dense float32 Linear (torch.matmul); `int8_dynamic` is torch's dynamically quantized int8 Linear
(FBGEMM), CPU only. Both read the weights a case's setup stores in its `layer` dict ("w", "bias");
`build_int8_dynamic` makes the FBGEMM module from them when that peer is timed.
"""
import torch
import torch.nn.functional as F


def mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def peers(layer: dict, device: torch.device) -> dict:
    timed = {"float32": lambda x: F.linear(x, layer["w"], layer["bias"])}
    if device.type == "cpu":  # torch's int8 dynamic quantization runs on the CPU only
        timed["int8_dynamic"] = lambda x: layer["int8"](x)
    return timed


def build_int8_dynamic(layer: dict, timed: dict) -> None:
    if "int8_dynamic" not in timed:
        return
    N, K = layer["w"].shape
    dense = torch.nn.Linear(K, N).eval()
    dense.weight.data.copy_(layer["w"])
    dense.bias.data.copy_(layer["bias"])
    layer["int8"] = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(dense), {torch.nn.Linear},
                                                           dtype=torch.qint8)
