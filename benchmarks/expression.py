"""Per-call overhead of a compiled expression, against evaluate() and plain torch.

An embedding program (an online-merging optimizer, a search) calls the same merge rule
many times on tensors it holds. `mergelang.expression` parses, resolves and lowers
once, and plans once per input shapes and values; this measures what each call still
costs, on a state dict of small tensors where the arithmetic itself is cheap:

    python benchmarks/expression.py [--tensors 32] [--rows 64] [--cols 64] [--calls 200]

It prints the median wall and CPU time per call of (1) plain torch, written by hand; (2) a
cached `mergelang.expression`; (3) `mergelang.evaluate`, which compiles every time. The
ratios use the CPU time (the process's, all threads), the steadier figure on a shared
machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mergelang

RULE = "base + 0.5 * (a - base) + 0.5 * (b - base)"


def state(seed: int, tensors: int, rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(rows, cols, generator=g) for i in range(tensors)}


def by_hand(base, a, b):
    return {k: base[k] + 0.5 * (a[k] - base[k]) + 0.5 * (b[k] - base[k]) for k in base}


def per_call(fn, calls: int) -> tuple[float, float]:
    """Median wall and CPU (process) seconds of a call; on a shared machine the CPU time
    is the steadier figure."""
    times, cpu = [], []
    for _ in range(calls):
        start, used = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    base, a, b = (state(s, args.tensors, args.rows, args.cols) for s in range(3))
    merge = mergelang.expression(RULE)
    expected = by_hand(base, a, b)
    got = merge(base=base, a=a, b=b)
    assert all(torch.allclose(got[k], expected[k]) for k in expected)
    results = {
        "torch by hand": per_call(lambda: by_hand(base, a, b), args.calls),
        "mergelang.expression (cached)": per_call(lambda: merge(base=base, a=a, b=b),
                                                  args.calls),
        "mergelang.evaluate (compiles each call)": per_call(
            lambda: mergelang.evaluate(RULE, base=base, a=a, b=b), max(args.calls // 10, 5)),
    }
    floor = results["torch by hand"][1]
    print(f"{args.tensors} tensors of {args.rows}x{args.cols}, rule: {RULE} "
          f"({torch.get_num_threads()} threads)")
    for name, (wall, cpu) in results.items():
        print(f"  {name:42s} {wall * 1e3:8.2f} ms/call wall {cpu * 1e3:8.2f} ms CPU  "
              f"{cpu / floor:7.1f}x torch (CPU)")
    print(f"  plans made by the expression: {merge.cached_plans}")


if __name__ == "__main__":
    main()
