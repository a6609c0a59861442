"""pytest-benchmark over the cases of accel.benchmark: ``pytest bench/`` times them, ``--benchmark-disable``
runs each once as a smoke test.

A ``bench_<op>.py`` file names its op (``OP = "<op>"``) and has one test taking the ``bench_step`` fixture;
this file collects such files, parametrizes the test over case x pass x implementation, and prepares each
case once (inputs, the compiled reference) for all of its tests.
"""
import pytest
import torch

from accel.benchmark import all_cases, harness


def pytest_addoption(parser):
    group = parser.getgroup("accel bench")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="device to benchmark on")
    group.addoption("--bench-quick", action="store_true",
                    help="only the small --quick cases (the default with --benchmark-disable)")


def pytest_collect_file(file_path, parent):
    # The bench files are named bench_<op>.py, not test_*.py, so pytest's default pattern misses them.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(harness.core_count())


def pytest_generate_tests(metafunc):
    if "bench_step" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = torch.device(config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device")
    quick = config.getoption("--bench-quick") or config.getoption("benchmark_disable", False)
    # Case outermost, so that each case is prepared (and its reference compiled) once.
    params = [(case, pass_, impl)
              for case in all_cases(quick, device, [metafunc.module.OP])
              for pass_ in case.passes
              for impl in (*harness.BUILTIN_IMPLS, *case.peers)
              if impl != "compiled" or case.compile]
    ids = [f"{case.name}-{pass_}-{impl}" for case, pass_, impl in params]
    metafunc.parametrize("bench_param", params, ids=ids)


_prepared: dict = {}  # the one case prepared now: preparing the next resets torch.compile's caches


@pytest.fixture
def bench_step(bench_param, benchmark, request):
    """One call of the (case, pass, implementation) under test, warmed up (compiled) and synchronized."""
    case, pass_, impl = bench_param
    device = torch.device(request.config.getoption("--bench-device"))
    if _prepared.get("case") is not case:
        _prepared.clear()
        _prepared.update(case=case, prepared=harness.prepare(case, device))
    p = _prepared["prepared"]
    step = harness.make_step(p.impls[impl], p.inputs, pass_, p.grad_out)
    sync = harness.synchronizer(device)
    if not request.config.getoption("benchmark_disable", False):
        step()  # compiles the compiled reference outside the timed calls
    benchmark.group = f"{case.op} {case.name} ({case.shape}) {pass_}"
    benchmark.extra_info.update(bytes_moved=case.bytes_moved[pass_], flops=case.flops[pass_])

    def synchronized_step():
        step()
        sync()

    return synchronized_step
