"""The benchmark's record of the machine: variables that hold PyTorch's libraries to an older instruction set
are recorded, reported, and name the results file apart from the unrestricted machine's."""
import torch

from accel.benchmark import harness, report

CPU = torch.device("cpu")


def test_isa_limits_are_recorded_reported_and_name_the_results_apart(monkeypatch):
    for name in harness.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain = harness.machine_slug(CPU)
    assert "isa_limits" not in harness.machine_info(CPU)

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert harness.machine_slug(CPU) == plain + "-isa-limited"
    info = harness.machine_info(CPU)
    assert info["isa_limits"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}

    limits = {"bandwidth_Bps": 1e10, "bandwidth_probe": "copy", "copy_Bps": 1e10, "read_Bps": 1e10,
              "flops_per_s": 1e11, "flops_probe": "sgemm"}
    run = {"machine": {**info, "loadavg_end": 0.0}, "limits": limits, "results": [], "command": "bench", "wall_s": 1.0}
    assert "instruction sets held back: `MKL_ENABLE_INSTRUCTIONS=AVX2`" in report.machine_section("m", run, None)
