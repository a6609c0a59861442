"""pytest-benchmark of accel.benchmark.binary_matmul: every case (inference: forward only), fast vs eager vs
torch.compile vs the peers (parametrized in conftest.py)."""
OP = "binary_matmul"


def test_binary_matmul(benchmark, bench_step):
    benchmark(bench_step)
