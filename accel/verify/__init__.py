"""``python -m accel verify``: every op against its float64 reference, as a table of errors and tolerances.

Each op contributes a module here whose ``checks(device)`` yields ``Check`` rows; the rule applied is
DESIGN.md's (accel.numerics). The exit status is non-zero when any row fails.
"""
from dataclasses import dataclass
import sys

import torch

from accel.numerics import judge
from accel.verify import (batch_norm_mix, binary_matmul, causal_conv, darts_pool_branches, depthwise_conv2d,
                          hopfield_update, krylov_kernel, mixed_op, quant_matmul)
from accel.verify import rk_finalize, rk_stage

OP_MODULES = {"mixed_op": mixed_op, "depthwise_conv2d": depthwise_conv2d, "darts_pool_branches": darts_pool_branches,
              "batch_norm_mix": batch_norm_mix, "krylov_kernel": krylov_kernel, "causal_conv": causal_conv,
              "hopfield_update": hopfield_update, "binary_matmul": binary_matmul,
              "quant_matmul": quant_matmul}
OP_MODULES.update({"rk_stage": rk_stage, "rk_finalize": rk_finalize})


@dataclass
class Check:
    op: str
    case: str
    output: str
    dtype: str
    error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed


def compare(op: str, case: str, names, fast, reference_in_dtype, reference64):
    """One Check per output, judged by the numerics rule."""
    for name, f, rd, r64 in zip(names, fast, reference_in_dtype, reference64):
        verdict = judge(f, rd, r64)
        yield Check(op, case, name, str(f.dtype).replace("torch.", ""), verdict.error, verdict.allowed)


def run(device: str = "cpu", ops=None, out=sys.stdout) -> bool:
    """Prints the table; returns whether every check passed."""
    rows = []
    header = f"{'op':<20} {'case':<34} {'output':<17} {'dtype':<9} {'error':>10} {'allowed':>10}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, module in OP_MODULES.items():
        if ops and name not in ops:
            continue
        for row in module.checks(device, compare):
            rows.append(row)
            print(f"{row.op:<20} {row.case:<34} {row.output:<17} {row.dtype:<9} {row.error:>10.2e} "
                  f"{row.allowed:>10.2e}  {'ok' if row.ok else 'FAIL'}", file=out)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed on {device}", file=out)
    return not failed and bool(rows)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m accel verify", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return 0 if run(args.device, args.ops.split(",") if args.ops else None) else 1
