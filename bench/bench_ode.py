"""pytest-benchmark of accel.benchmark.ode: every case, forward and forward+backward, fast (accel.odeint) vs eager
(torchdiffeq's dopri5) vs torchode (parametrized in conftest.py; no compiled reference, see accel/benchmark/ode.py)."""
OP = "ode"


def test_ode(benchmark, bench_step):
    benchmark(bench_step)
