"""Command line: ``python -m accel info | verify | bench`` (``--help`` on each)."""
import sys

USAGE = """usage: python -m accel {info,verify,bench} [options]

  info     versions, CPU features and which backend serves each op
  verify   every op against its float64 reference; non-zero exit on any failure
  bench    every op against eager PyTorch and torch.compile; writes bench/results and BENCHMARKS.md
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from accel import info

        return info.main(rest)
    if command == "verify":
        from accel import verify

        return verify.main(rest)
    if command == "bench":
        from accel import benchmark

        return benchmark.main(rest) or 0
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
