"""Thread safety: every public op (accel.ops.__all__) and accel.odeint, called from 4 Python threads at once on
different inputs, gives bitwise the results of the same calls made one after another. The C++ kernels release
the GIL and keep scratch buffers per thread (thread_local) or per call, and the ops' Python layers keep caches;
a buffer or cache shared between calls would show up here as a wrong result or a crash. The calls are small
(tests/op_cases.py), forward and, for ops with a backward, the gradients."""
from concurrent.futures import ThreadPoolExecutor
import threading

import pytest
import torch

import accel.ops
from op_cases import CASES, assert_bitwise_equal, bitwise_equal, run_case

THREADS = 4
REPEATS = 3  # calls per thread, so that each thread's calls overlap the others' whatever the start-up skew


def test_cases_cover_every_public_op():
    covered = {name for case in CASES for name in case.ops}
    assert covered == set(accel.ops.__all__)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_concurrent_calls_give_the_serial_results(case):
    inputs = [case.make(torch.Generator().manual_seed(seed)) for seed in range(THREADS)]
    serial = [case.run(d) for d in inputs]
    # the inputs differ, and so do the results: the comparisons below are not between equal constants
    assert any(not bitwise_equal(a, b) for a, b in zip(serial[0], serial[1]))
    barrier = threading.Barrier(THREADS)

    def calls(d):
        barrier.wait()  # start together
        return [case.run(d) for _ in range(REPEATS)]

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(calls, inputs))
    for seed, (want, got) in enumerate(zip(serial, concurrent)):
        for r, results in enumerate(got):
            assert_bitwise_equal(results, want, f"{case.name}, thread {seed}, call {r}")


def test_different_ops_at_once_give_the_serial_results():
    """Each thread runs every case, starting at a different one, so different kernels (and their per-thread
    scratch buffers) run side by side."""
    serial = {(case.name, seed): run_case(case, seed) for case in CASES for seed in range(THREADS)}
    barrier = threading.Barrier(THREADS)

    def calls(seed):
        barrier.wait()
        order = CASES[seed * len(CASES) // THREADS:] + CASES[:seed * len(CASES) // THREADS]
        return {(case.name, seed): run_case(case, seed) for case in order}

    with ThreadPoolExecutor(THREADS) as pool:
        for got in pool.map(calls, range(THREADS)):
            for key, results in got.items():
                assert_bitwise_equal(results, serial[key], f"{key[0]}, thread {key[1]}")
