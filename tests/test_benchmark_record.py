"""The benchmark's record of the machine: variables that hold PyTorch's libraries to an older instruction set
are recorded, reported, and name the results file apart from the unrestricted machine's."""
import torch

from accel.benchmark import harness, report

CPU = torch.device("cpu")


def report_section(info: dict) -> str:
    """The report's section for a run on a machine described by ``info``, with made-up limits and no results."""
    limits = {"bandwidth_Bps": 1e10, "bandwidth_probe": "copy", "copy_Bps": 1e10, "read_Bps": 1e10,
              "flops_per_s": 1e11, "flops_probe": "sgemm"}
    run = {"machine": {**info, "loadavg_end": 0.0}, "limits": limits, "results": [], "command": "bench", "wall_s": 1.0}
    return report.machine_section("m", run, None)


def test_isa_limits_are_recorded_reported_and_name_the_results_apart(monkeypatch):
    for name in harness.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain = harness.machine_slug(CPU)
    assert "isa_limits" not in harness.machine_info(CPU)

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert harness.machine_slug(CPU) == plain + "-isa-limited"
    info = harness.machine_info(CPU)
    assert info["isa_limits"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}

    assert "instruction sets held back: `MKL_ENABLE_INSTRUCTIONS=AVX2`" in report_section(info)


def test_compiled_references_get_avx2_code_where_inductor_would_use_avx512(monkeypatch):
    """torch 2.13's Inductor, generating AVX-512 code, corrupted the heap on two references: there the harness hands
    torch.compile 256-bit vectors and the report says so; elsewhere it leaves torch.compile alone."""
    from accel.benchmark import hopfield_update

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    for capability, options in (("AVX512", {"cpp.simdlen": 256}), ("AVX2", None)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        harness.implementations(hopfield_update.cases(quick=True, device=CPU)[0], CPU)
        assert seen.pop()["options"] == options
        info = harness.machine_info(CPU)
        assert info.get("inductor_options") == options
        assert ("cpp.simdlen" in report_section(info)) == (options is not None)
