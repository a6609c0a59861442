"""``python -m accel bench``: run the benchmark, write bench/results/<machine>.json, regenerate BENCHMARKS.md."""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from accel.benchmark import OP_MODULES, all_cases, harness, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="accel bench",
        description="Time every op side by side with its eager reference, torch.compile of it and outside peers.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: two small cases per op, few repetitions (under a minute on 2 CPU cores)")
    parser.add_argument("--ops", type=lambda s: [o for o in s.split(",") if o],
                        help=f"comma-separated ops to run (default: all of {','.join(OP_MODULES)})")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: bench/results/<machine>.json, <machine>-quick.json with --quick)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md and the plots")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave glibc's malloc as it is (by default it is told to keep freed memory, so that "
                             "per-step page faults do not mask the kernels' differences)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("accel bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        cases = all_cases(args.quick, device, args.ops)
    except ValueError as exc:
        print(f"accel bench: {exc}", file=sys.stderr)
        return 2

    # All cores, said explicitly and recorded: torch's default may differ under a container's CPU quota.
    torch.set_num_threads(harness.core_count())
    settings = harness.Settings.quick() if args.quick else harness.Settings()
    start = time.perf_counter()
    run = harness.run(cases, device, settings, log=_log, system_allocator=args.system_allocator)
    run.update(command=shlex.join(["python", "-m", "accel", "bench", *argv]), quick=args.quick,
               wall_s=time.perf_counter() - start)

    slug = harness.machine_slug(device)
    out = args.out or report.default_results_dir() / (f"{slug}-quick.json" if args.quick else f"{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1) + "\n")
    _log(f"wrote {out} ({run['wall_s']:.0f} s)")
    if not args.no_report:
        for line in report.write_report():
            _log(line)
    return 0


def _log(line: str) -> None:
    print(line, flush=True)
