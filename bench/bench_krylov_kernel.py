"""pytest-benchmark of accel.benchmark.krylov_kernel: every case, forward and forward+backward, fast vs eager vs
torch.compile (parametrized in conftest.py)."""
OP = "krylov_kernel"


def test_krylov_kernel(benchmark, bench_step):
    benchmark(bench_step)
