"""Peak memory of one LSSL layer forward+backward at a long sequence, on the CPU.

    python bench/lssl_memory.py [--length 16384] [--batch 16] [--features 256] [--state 64]

Prints the process's peak resident memory (VmHWM) before and after, and the growth: what the step needed on
top of the inputs, the parameters and the interpreter. Run it in a fresh process: the peak is never reset.
"""
import argparse
import time

import torch

from accel.nn import LSSL


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--state", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = LSSL(args.features, args.state)
    u = torch.randn(args.batch, args.length, args.features, requires_grad=True)
    grad = torch.randn(args.batch, args.length, args.features)
    before = peak_rss_mib()
    start = time.perf_counter()
    layer(u).backward(grad)
    seconds = time.perf_counter() - start
    after = peak_rss_mib()
    inputs = 2 * u.numel() * u.element_size() / 2 ** 20
    print(f"LSSL B={args.batch} L={args.length} H={args.features} N={args.state}: fwd+bwd {seconds:.1f} s; "
          f"peak RSS {before:.0f} MiB before (u and grad: {inputs:.0f} MiB), {after:.0f} MiB after: "
          f"+{after - before:.0f} MiB")


if __name__ == "__main__":
    main()
