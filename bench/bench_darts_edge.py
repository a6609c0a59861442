"""pytest-benchmark of accel.benchmark.darts_edge: every case, forward and forward+backward, fast vs eager vs
torch.compile (parametrized in conftest.py)."""
OP = "darts_edge"


def test_darts_edge(benchmark, bench_step):
    benchmark(bench_step)
