"""pytest-benchmark of accel.benchmark.darts_cell: every case, forward and forward+backward, fast vs eager vs
torch.compile (parametrized in conftest.py)."""
OP = "darts_cell"


def test_darts_cell(benchmark, bench_step):
    benchmark(bench_step)
