"""Shared test helpers: the numerics rule as an assertion, poisoned outputs, seeded randomness, Triton
kernels under the interpreter; and the session's guards against passing vacuously:

- without the compiled extension every CPU op runs its reference, and the suite would compare the references
  with themselves: the session stops at once unless ACCEL_ALLOW_REFERENCE_ONLY=1 (for running the suite on
  the reference-only fallback on purpose);
- a skipped test fails the session, since the test environment (constraints.txt) installs everything the suite
  imports, unless ACCEL_ALLOW_SKIPS=1 (a partial environment, on purpose). Skips are listed (-rs).
"""
import copy
import importlib.util
import itertools
import os

import pytest
import torch

from accel import _extension
from accel.numerics import judge


def pytest_configure(config):
    if not _extension.LOADED and os.environ.get("ACCEL_ALLOW_REFERENCE_ONLY") != "1":
        raise pytest.UsageError(
            f"accel._C did not load ({_extension.LOAD_ERROR}): every op would be tested against itself. Build it "
            f"with `{_extension.REBUILD_COMMAND}`, or set ACCEL_ALLOW_REFERENCE_ONLY=1 to test the references alone.")
    config.option.reportchars = "".join(sorted(set((config.option.reportchars or "") + "s")))


def pytest_sessionfinish(session, exitstatus):
    skipped = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = skipped.stats.get("skipped", []) if skipped is not None else []
    if skipped and exitstatus == 0 and os.environ.get("ACCEL_ALLOW_SKIPS") != "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n{len(skipped)} test(s) skipped: the test environment should run them all "
              f"(see the skip reasons above; ACCEL_ALLOW_SKIPS=1 accepts skips on purpose)")

# Every op is tested on the CPU, and on CUDA too where a GPU is present (bench/gpu_check.sh).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_by_rule(fast: torch.Tensor, reference_in_dtype: torch.Tensor, reference64: torch.Tensor, what: str = "",
                   factor: float = 2.0, scale: float = 0.0):
    """Asserts DESIGN.md's numerics rule: error <= factor * (reference's own error in that dtype) + floor, with
    the rule's factor 2 unless a test says why not, and errors in units of max(max|reference|, scale) (scale: the
    operands' magnitude, accel.numerics.operand_scale, where the reference may be zero or tiny next to them)."""
    assert fast.shape == reference64.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(reference64.shape)}"
    verdict = judge(fast, reference_in_dtype, reference64, factor, scale)
    assert verdict.ok, (
        f"{what}: error {verdict.error:.3g} > allowed {verdict.allowed:.3g} "
        f"(reference in {fast.dtype}: {verdict.reference_error:.3g})"
    )


def outputs_and_gradients(fn, module, inputs, seed):
    """fn(module, *inputs), and the gradients of <g, output> (g random, drawn from seed) with respect to the
    floating inputs and the module's trainable parameters: {name: tensor}."""
    leaves = [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = fn(module, *leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    wrt = [(f"grad of input {i}", x) for i, x in enumerate(leaves) if x.is_floating_point()]
    wrt += [(f"grad of {name}", p) for name, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [t for _, t in wrt], g, allow_unused=True, materialize_grads=True)
    return {"output": out.detach(), **{name: grad for (name, _), grad in zip(wrt, grads)}}


def perturbed_copy(module, inputs, gen):
    """A float64 copy of the module and inputs with every value moved by up to half a float32 ulp: another
    rounding as likely as float32's own (a draw of the reference's float32 error, rounded back)."""
    def move(t):
        eps = torch.finfo(torch.float32).eps
        return t * (1 + eps / 2 * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1))

    module = copy.deepcopy(module)
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point():
                t.copy_(move(t))
    return module, [move(x) if x.is_floating_point() else x for x in inputs]


@pytest.fixture
def poisoned_outputs():
    """Makes every torch.empty (in C++ kernels too) fill with NaN, so an unwritten element shows up."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling


@pytest.fixture
def one_thread():
    """One intra-op thread, for modules of many small calls: on a loaded 2-core machine a second thread only adds
    OpenMP synchronisation, which can cost more than the work (test_threads.py and test_determinism.py cover the
    kernels' thread splits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def interpreted_kernels(name: str):
    """A private copy of accel.kernels.<name> whose kernels run under TRITON_INTERPRET=1 on CPU tensors.

    Triton decides at @triton.jit time whether a kernel is interpreted, so the variable must be set while
    the module is imported; it is restored afterwards, so that the rest of the session (the CUDA tests on a
    GPU machine) still gets the compiled kernels from accel.kernels.<name>. Skips without Triton.
    """
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        spec = importlib.util.find_spec(f"accel.kernels.{name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
