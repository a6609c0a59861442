"""Determinism on the CPU: the same inputs give bitwise the same outputs and gradients run to run, and whatever
the thread count (torch.set_num_threads(1) and 2), for every op with a backward and for accel.odeint
(README.md, "Determinism"). The C++ kernels split work over threads by the data (planes, heads, fixed chunks),
never by the thread count, and sum per-task partial results in a fixed order; the cases' shapes
(tests/op_cases.py) are large enough that two threads do split the work."""
import pytest
import torch

from op_cases import CASES, assert_bitwise_equal, run_case

WITH_BACKWARD = [c for c in CASES if c.backward]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", WITH_BACKWARD, ids=[c.name for c in WITH_BACKWARD])
def test_outputs_and_gradients_are_bitwise_reproducible(case, restore_threads):
    torch.set_num_threads(2)
    first = run_case(case, 7)
    run_case(case, 8)  # other inputs in between: scratch buffers and the allocator's blocks are reused dirty
    assert_bitwise_equal(run_case(case, 7), first, f"{case.name}, second run")


@pytest.mark.parametrize("case", WITH_BACKWARD, ids=[c.name for c in WITH_BACKWARD])
def test_results_do_not_depend_on_the_thread_count(case, restore_threads):
    torch.set_num_threads(2)
    two = run_case(case, 11)
    torch.set_num_threads(1)
    assert_bitwise_equal(run_case(case, 11), two, f"{case.name}, 1 thread vs 2")
