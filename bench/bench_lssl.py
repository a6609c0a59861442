"""pytest-benchmark of accel.benchmark.lssl: every case, forward and forward+backward, fast vs eager vs
torch.compile (parametrized in conftest.py)."""
OP = "lssl"


def test_lssl(benchmark, bench_step):
    benchmark(bench_step)
