"""The benchmark engine, generic over ops: times every implementation of a case side by side.

A `Case` names one problem (op, shape, inputs) and the callables that solve it: the fast op, the eager
reference, and optional outside peers; the harness adds `torch.compile(reference)` itself (unless the case
says ``compile=False``). For each case the harness

- times the forward pass and the forward+backward pass of every implementation, interleaved in rounds
  (A, B, C, A, B, C, ...) so that machine noise hits all of them alike, and reports the median and the
  interquartile range of the samples;
- measures the bytes kept for backward (``saved_tensors_hooks``; on CUDA also the allocator's peak);
- relates each time to the machine's roofline, from the bytes and FLOPs the fast op must move and the
  copy bandwidth and sgemm FLOP/s measured in the same run (`measure_limits`).

"fwd" is the forward of a training step: the inputs require grad, so the autograd graph is built and
its tensors saved, exactly as when the op sits in a model being trained. That also lets one compiled
graph serve both passes, so each case compiles once.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

PASSES = ("fwd", "fwd+bwd")
BUILTIN_IMPLS = ("fast", "eager", "compiled")


@dataclass
class Case:
    """One benchmark problem and the implementations that solve it.

    ``setup(device)`` returns the positional inputs (tensors, or lists of tensors); those that require grad
    are the ones differentiated in the backward pass. ``fast``, ``reference`` and each peer take these
    inputs and return one tensor. ``bytes_moved`` and ``flops`` are what the fast op must move and compute,
    per pass (keys of `PASSES`), for the roofline. ``size`` (the problem size, e.g. input bytes) and
    ``sweeps`` (names of the size sweeps the case belongs to) place the case in the report's plot.
    ``compile=False`` leaves out the compiled reference; ``info`` adds numbers per implementation (see below).
    """

    name: str
    op: str
    shape: str
    setup: Callable[[torch.device], tuple]
    fast: Callable
    reference: Callable
    bytes_moved: dict[str, float]
    flops: dict[str, float]
    backward: bool = True
    peers: dict[str, Callable] = field(default_factory=dict)
    size: float | None = None
    sweeps: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    compile: bool = True  # False: no torch.compile(reference) (e.g. an adaptive solver, whose host syncs break graphs)
    # info(name, fn, inputs): an implementation's extra numbers (e.g. {"nfe": 38}), recorded and shown beside its times
    info: Callable[[str, Callable, tuple], dict] | None = None

    @property
    def passes(self) -> tuple[str, ...]:
        return PASSES if self.backward else PASSES[:1]


@dataclass
class Settings:
    """How long to time. Each (implementation, pass) gets ``min_rounds`` to ``max_rounds`` samples, as many as
    fit in ``budget_s`` for the whole case; a sample repeats the call until it lasts ``min_sample_s``."""

    warmup: int = 3
    min_rounds: int = 7
    max_rounds: int = 100
    budget_s: float = 8.0
    min_sample_s: float = 2e-3
    limit_reps: int = 20

    @classmethod
    def quick(cls) -> "Settings":
        return cls(warmup=2, min_rounds=5, max_rounds=20, budget_s=1.0, limit_reps=4)


# ---------------------------------------------------------------------------------------------------------
# The machine


# Environment variables that hold PyTorch's libraries (ATen's kernels, MKL, oneDNN, FBGEMM) to an older
# instruction set, e.g. to time on an AVX-512 machine what an AVX2 one would run. They change every peer's
# kernels, so they are recorded and name the results file apart.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")


def isa_limits() -> dict[str, str]:
    return {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}


def machine_info(device: torch.device) -> dict:
    """What the numbers depend on: hardware, thread count, versions, and how busy the machine was."""
    info = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cores": core_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _simd_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
    }
    if device.type == "cpu" and (limits := isa_limits()):
        info["isa_limits"] = limits
    if options := inductor_options(device):
        info["inductor_options"] = options
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def keep_freed_memory() -> str:
    """Tells glibc's malloc to keep freed memory rather than hand it back to the OS after every step.

    By default glibc unmaps or trims large freed blocks, so each step page-faults its outputs in afresh and
    the OS zeroes every 4 KiB page first: that costs every implementation alike, grows with the output size
    and hides the kernels' own differences. jemalloc and tcmalloc, which PyTorch recommends for CPU
    training, keep memory the same way. Returns what was done, for the record.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is the largest mmap threshold glibc accepts; blocks below it come from the kept heap.
    if mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30):
        return "glibc, freed memory kept (mallopt M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB)"
    return "system default (mallopt refused)"


def machine_slug(device: torch.device) -> str:
    """File-name stem for a machine's results, e.g. ``amd-epyc-2c``, ``intel-xeon-processor-2c-isa-limited`` (run
    under ISA_LIMITS) or ``nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_model()} {core_count()}c"
    if device.type == "cpu" and isa_limits():
        name += " isa limited"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> int:
    # The cores this process may run on (a container or taskset may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _simd_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if re.match(r"(sse4|avx|fma|amx|f16c|bf16)", f))
    except OSError:
        pass
    return []


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measure_limits(device: torch.device, settings: Settings) -> dict:
    """The machine's memory bandwidth and sgemm FLOP/s (2048^3 float32 matmul), as medians, measured now
    so that they share the cases' conditions.

    Bandwidth is the better of a 256 MiB copy_ (bytes read + written) and a 256 MiB sum (bytes read): a
    copy's stores also cost a read for ownership, so read-heavy ops can beat the copy rate, and the roofline
    must be one that no op exceeds.
    """
    src = torch.randn(64 * 2**20, device=device)  # 256 MiB: far beyond any cache
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src), device, settings.limit_reps)
    read_s = _median_time(lambda: src.sum(), device, settings.limit_reps)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    mm_s = _median_time(lambda: torch.mm(a, b), device, settings.limit_reps)
    copy_bps, read_bps = 2 * src.nbytes / copy_s, src.nbytes / read_s
    return {
        "bandwidth_Bps": max(copy_bps, read_bps),
        "copy_Bps": copy_bps,
        "read_Bps": read_bps,
        "flops_per_s": 2 * 2048**3 / mm_s,
        "bandwidth_probe": "the better of copy_ (read + write bytes) and sum (read bytes) of 256 MiB float32",
        "flops_probe": "2048^3 float32 matmul",
    }


def _median_time(fn: Callable, device: torch.device, reps: int) -> float:
    fn()  # first call pays for allocation and library start-up
    sync = synchronizer(device)
    return statistics.median(_sample(fn, 1, sync) for _ in range(reps))


def roofline_seconds(case: Case, pass_: str, limits: dict) -> float:
    """The least time the pass can take: bound by the bytes it moves and by the FLOPs it computes."""
    return max(case.bytes_moved[pass_] / limits["bandwidth_Bps"], case.flops[pass_] / limits["flops_per_s"])


# ---------------------------------------------------------------------------------------------------------
# Implementations and the steps that are timed


def inductor_options(device: torch.device) -> dict | None:
    """torch.compile's Inductor options for the compiled references: on a CPU where Inductor would generate
    AVX-512 code, AVX2 code (256-bit vectors), as accel's own CPU kernels are. torch 2.13's AVX-512 code corrupted
    the heap and aborted the run on an Intel Xeon with AVX-512 and AMX, in two cases of plain PyTorch: the Hopfield
    loop at B=8 L=S=1024, 3 steps, and the int8 fake-quantized Linear at M=1, K=N=4096; with 256-bit vectors
    both run. (ATEN_CPU_CAPABILITY=avx2 holds Inductor to AVX2 as well.)"""
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return {"cpp.simdlen": 256}
    return None


def implementations(case: Case, device: torch.device) -> dict[str, Callable]:
    """fast, eager, compiled, then the peers. The compiled reference is made fresh for each case, with
    static shapes, so no case sees another case's graph or a dynamic-shape recompile."""
    compiled = {"compiled": torch.compile(case.reference, dynamic=False, options=inductor_options(device))} \
        if case.compile else {}
    return {"fast": case.fast, "eager": case.reference, **compiled, **case.peers}


def tensors_in(inputs: Iterable) -> list[torch.Tensor]:
    """The tensors among the inputs, looking one level into lists and tuples."""
    found = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            found.extend(t for t in x if isinstance(t, torch.Tensor))
    return found


def make_step(fn: Callable, inputs: tuple, pass_: str, grad_out: torch.Tensor | None) -> Callable[[], None]:
    """A zero-argument call that runs one pass. The backward uses ``torch.autograd.grad`` with the fixed
    upstream gradient: it returns the gradients instead of accumulating them, so no zeroing is needed."""
    if pass_ == "fwd":
        return lambda: fn(*inputs)
    leaves = [t for t in tensors_in(inputs) if t.requires_grad]

    def forward_backward():
        torch.autograd.grad(fn(*inputs), leaves, grad_out)

    return forward_backward


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA runs asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _sample(step: Callable, number: int, sync: Callable) -> float:
    """Seconds per call, over ``number`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(number):
        step()
    sync()
    return (time.perf_counter() - start) / number


# ---------------------------------------------------------------------------------------------------------
# Memory kept for backward


def saved_for_backward(fn: Callable, inputs: tuple) -> dict:
    """Bytes of the tensors autograd keeps from a forward of ``fn``: all unique storages, and those that are
    not storages of the inputs (the memory the op adds on top of what the caller holds anyway)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    input_ptrs = {t.untyped_storage().data_ptr() for t in tensors_in(inputs)}
    return {
        "bytes": sum(storages.values()),
        "non_input_bytes": sum(n for p, n in storages.items() if p not in input_ptrs),
        "tensors": len(storages),
    }


def cuda_memory(fn: Callable, inputs: tuple, grad_out: torch.Tensor, device: torch.device) -> dict:
    """On CUDA, from the allocator: bytes still held after the forward (saved tensors and the output) and
    the peak over forward+backward, both above what was allocated before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(*inputs)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    leaves = [t for t in tensors_in(inputs) if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, grads
    return {"held_after_forward_bytes": held, "peak_fwd_bwd_bytes": peak}


# ---------------------------------------------------------------------------------------------------------
# Running a case


@dataclass
class Prepared:
    """A case made ready to time: its inputs, implementations, the eager output and the upstream gradient."""

    inputs: tuple
    impls: dict[str, Callable]
    expected: torch.Tensor
    grad_out: torch.Tensor


def prepare(case: Case, device: torch.device) -> Prepared:
    """Builds the inputs and implementations of ``case``. Resets torch.compile's caches first: the references
    of all cases of an op share one code object, whose earlier graphs would count against the recompile
    limit and be checked on every call."""
    torch._dynamo.reset()
    inputs = case.setup(device)
    with torch.no_grad():
        expected = case.reference(*inputs)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(device, expected.dtype)
    return Prepared(inputs, implementations(case, device), expected, grad_out)


def run_case(case: Case, device: torch.device, settings: Settings, limits: dict,
             log: Callable[[str], None] = print) -> dict:
    """Times every implementation of ``case`` on ``device``; returns the case's result record."""
    p = prepare(case, device)
    ready, impl_info = {}, {}
    for name, fn in p.impls.items():
        impl_info[name] = _warm_up(name, fn, case, p, settings, log)
        if "error" not in impl_info[name]:
            ready[name] = fn

    samples = _time_interleaved(ready, case, p, impl_info, device, settings)
    record = _record(case, impl_info, samples, limits)
    _add_memory(record, ready, p, device)
    for line in _summary_lines(record):
        log(line)
    return record


def _warm_up(name: str, fn: Callable, case: Case, p: Prepared, settings: Settings, log: Callable) -> dict:
    """Calls each pass a few times (the compiled one compiles here), checks the output against the eager
    reference, and estimates the time per call, which sets how many calls make one sample."""
    info = {}
    start = time.perf_counter()
    try:
        got = fn(*p.inputs).detach()  # with grad on, as timed: a no_grad call would compile a second graph
        info["max_abs_diff"] = (got.float() - p.expected.float()).abs().max().item() if got.numel() else 0.0
        info["first_call_s"] = time.perf_counter() - start
        info["estimate_s"] = {}
        for pass_ in case.passes:
            step = make_step(fn, p.inputs, pass_, p.grad_out)
            for _ in range(settings.warmup):
                t = time.perf_counter()
                step()
                info["estimate_s"][pass_] = time.perf_counter() - t
    except Exception as exc:  # one failing implementation (e.g. no C++ compiler for inductor) must not end the run
        info["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"    {name:<10} FAILED: {info['error']}")
        return info
    info["warmup_s"] = time.perf_counter() - start
    if case.info is not None:
        try:
            info["info"] = case.info(name, fn, p.inputs)
        except Exception as exc:  # the extra numbers are a bonus: their failure leaves the timing alone
            info["info"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    extra = "".join(f"   {k} {v}" for k, v in info.get("info", {}).items())
    log(f"    {name:<10} warm-up {info['warmup_s']:6.1f} s   max|out - eager| {info['max_abs_diff']:.2e}{extra}")
    return info


def _time_interleaved(impls: dict, case: Case, p: Prepared, impl_info: dict, device: torch.device,
                      settings: Settings) -> dict:
    """Samples every (implementation, pass) once per round, round after round, until the case's time budget
    is spent (at least ``min_rounds``, at most ``max_rounds``)."""
    sync = synchronizer(device)
    plan = []
    for pass_ in case.passes:
        for name, fn in impls.items():
            number = max(1, math.ceil(settings.min_sample_s / max(impl_info[name]["estimate_s"][pass_], 1e-7)))
            impl_info[name].setdefault("calls_per_sample", {})[pass_] = number
            plan.append((name, pass_, make_step(fn, p.inputs, pass_, p.grad_out), number))
    samples = {(name, pass_): [] for name, pass_, *_ in plan}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would charge that implementation alone
    start, rounds = time.perf_counter(), 0
    try:
        while rounds < settings.max_rounds and (rounds < settings.min_rounds
                                                or time.perf_counter() - start < settings.budget_s):
            for name, pass_, step, number in plan:
                samples[(name, pass_)].append(_sample(step, number, sync))
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _stats(values: list[float]) -> dict:
    if len(values) > 1:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = median = q3 = values[0]
    return {"median_s": median, "iqr_s": q3 - q1, "q1_s": q1, "q3_s": q3, "min_s": min(values), "n": len(values)}


def _record(case: Case, impl_info: dict, samples: dict, limits: dict) -> dict:
    passes = {}
    for pass_ in case.passes:
        roof = roofline_seconds(case, pass_, limits)
        timed = {}
        for name in impl_info:
            if (name, pass_) in samples:
                timed[name] = _stats(samples[(name, pass_)])
                timed[name]["roofline_pct"] = 100.0 * roof / timed[name]["median_s"]
        fast = timed.get("fast", {}).get("median_s")
        ratios = {f"{name}/fast": t["median_s"] / fast for name, t in timed.items() if name != "fast" and fast}
        passes[pass_] = {"bytes_moved": case.bytes_moved[pass_], "flops": case.flops[pass_],
                         "roofline_s": roof, "impls": timed, "ratios": ratios}
    return {"op": case.op, "case": case.name, "shape": case.shape, "params": case.params, "size": case.size,
            "sweeps": list(case.sweeps), "passes": passes,
            "impls": {name: {k: v for k, v in info.items() if k != "estimate_s"} for name, info in impl_info.items()}}


def _add_memory(record: dict, impls: dict, p: Prepared, device: torch.device) -> None:
    if "fwd+bwd" not in record["passes"]:
        return
    saved = {}
    for name, fn in impls.items():
        try:
            saved[name] = saved_for_backward(fn, p.inputs)
            if device.type == "cuda":
                saved[name].update(cuda_memory(fn, p.inputs, p.grad_out, device))
        except Exception as exc:  # a peer may not support saved-tensor hooks; its timing still stands
            saved[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    record["saved_for_backward"] = saved


def _summary_lines(record: dict) -> list[str]:
    lines = []
    for pass_, res in record["passes"].items():
        for name, t in res["impls"].items():
            ratio = res["ratios"].get(f"{name}/fast")
            vs_fast = f"  {name}/fast {ratio:.2f}x" if ratio else ""
            lines.append(f"    {name:<10} {pass_:<8} median {format_seconds(t['median_s']):>9}  "
                         f"IQR {format_seconds(t['iqr_s']):>9}  n={t['n']:<3} {t['roofline_pct']:5.1f}% roofline{vs_fast}")
    return lines


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def run(cases: list[Case], device: torch.device, settings: Settings, log: Callable[[str], None] = print,
        system_allocator: bool = False) -> dict:
    """Measures the machine, then every case; returns the whole run as one JSON-ready dict."""
    info = machine_info(device)
    if device.type == "cpu":
        info["allocator"] = "system default" if system_allocator else keep_freed_memory()
    log(f"accel bench: {len(cases)} cases on {device} ({info.get('gpu', info['cpu'])}, "
        f"{info['threads']} threads, torch {info['torch']})")
    if info["loadavg_start"] is not None and info["loadavg_start"] > 0.5:
        # Other work takes cores from the benchmark's threads; parallel regions then wait for them.
        log(f"  warning: load average {info['loadavg_start']:.2f} before the run: the machine is busy, times will be noisy")
    limits = measure_limits(device, settings)
    log(f"  machine limits: copy {limits['copy_Bps'] / 1e9:.1f} GB/s, read {limits['read_Bps'] / 1e9:.1f} GB/s, "
        f"sgemm {limits['flops_per_s'] / 1e9:.1f} GFLOP/s")
    results = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.op} {case.name} ({case.shape})")
        results.append(run_case(case, device, settings, limits, log))
    info["loadavg_end"] = _loadavg()
    return {"machine": info, "limits": limits, "results": results}
