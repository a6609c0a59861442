"""pytest-benchmark of accel.ops.mixed_op: every case of accel.benchmark.mixed_op, forward and
forward+backward, fast vs eager vs torch.compile (parametrized in conftest.py)."""
OP = "mixed_op"


def test_mixed_op(benchmark, bench_step):
    benchmark(bench_step)
