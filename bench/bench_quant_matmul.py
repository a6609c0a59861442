"""pytest-benchmark of accel.benchmark.quant_matmul: every case (inference: forward only), fast vs eager vs
torch.compile vs the peers (parametrized in conftest.py)."""
OP = "quant_matmul"


def test_quant_matmul(benchmark, bench_step):
    benchmark(bench_step)
