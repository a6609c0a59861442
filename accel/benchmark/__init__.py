"""accel.benchmark: times every op against its eager reference, torch.compile of it and outside peers.

Each op has a module here whose ``cases(quick, device)`` returns its `Case` list; `OP_MODULES` is the
registry, so a new op adds its module and one name below. `main` is ``python -m accel bench``.
"""
import importlib

import torch

from accel.benchmark.harness import Case

# One entry per op with benchmark cases: the module accel.benchmark.<name>.
OP_MODULES = ("mixed_op", "darts_edge", "darts_cell", "krylov_kernel", "lssl", "hopfield_update", "binary_matmul",
              "quant_matmul", "ode")


def all_cases(quick: bool, device: torch.device | str, ops: list[str] | None = None) -> list[Case]:
    """The cases of every registered op (or of ``ops`` only), in registry order."""
    device = torch.device(device)
    unknown = set(ops or ()) - set(OP_MODULES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; ops with benchmarks: {', '.join(OP_MODULES)}")
    cases = []
    for name in OP_MODULES:
        if ops is None or name in ops:
            cases.extend(importlib.import_module(f"accel.benchmark.{name}").cases(quick, device))
    return cases


def main(argv: list[str] | None = None) -> int:
    """``accel bench`` on the command line; returns the exit status."""
    from accel.benchmark.cli import main as cli_main

    return cli_main(argv)


__all__ = ["Case", "OP_MODULES", "all_cases", "main"]
