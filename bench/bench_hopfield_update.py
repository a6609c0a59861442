"""pytest-benchmark of accel.benchmark.hopfield_update: every case, forward and forward+backward, fast vs eager vs
torch.compile (parametrized in conftest.py)."""
OP = "hopfield_update"


def test_hopfield_update(benchmark, bench_step):
    benchmark(bench_step)
