"""Compiler figures: full compile of 10,000 workloads / 1,000 rules, one label change
recompiled incrementally, and the naive oracle on a smaller policy for comparison.

    python bench/bench_compile.py [--workloads N] [--rules N]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulkhead.policy.compile import Compiler, compile_naive
from synth import make_policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=1_000)
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    t = time.perf_counter()
    policy = make_policy(args.workloads, args.rules, seed=1)
    print(f"synthetic policy: {len(policy.workloads)} workloads, "
          f"{sum(len(r.rules) for r in policy.rulesets)} rules "
          f"({time.perf_counter() - t:.2f} s to build)")

    t = time.perf_counter()
    compiler = Compiler(policy)
    full = time.perf_counter() - t
    n_rules = sum(len(c.inbound) + len(c.outbound) for c in compiler.compiled.values())
    print(f"full compile: {full:.2f} s ({len(compiler.resolved.instances)} rule instances, "
          f"{n_rules} compiled rules)   target <= 10 s")

    rng = random.Random(7)
    names = sorted(compiler.workloads)
    apps = sorted({w.label("app") for w in policy.workloads if w.label("app")})
    times, touched = [], []
    for _ in range(args.changes):
        w = compiler.workloads[rng.choice(names)]
        labels = dict(w.labels)
        labels["app"] = rng.choice(apps)  # type: ignore[assignment]
        t = time.perf_counter()
        changed = compiler.update_workload(replace(w, labels=tuple(sorted(labels.items()))))
        times.append(time.perf_counter() - t)
        touched.append(len(changed))
    times.sort()
    print(f"one label change, incremental: median {times[len(times) // 2] * 1000:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms over {args.changes} changes "
          f"(median {sorted(touched)[len(touched) // 2]} workloads recompiled)   "
          "target <= 100 ms")

    small = make_policy(1_000, 100, seed=1)
    t = time.perf_counter()
    compile_naive(small)
    naive = time.perf_counter() - t
    t = time.perf_counter()
    Compiler(small)
    fast = time.perf_counter() - t
    print(f"1,000 workloads / 100 rules: naive {naive:.2f} s, identity-based {fast:.2f} s")


if __name__ == "__main__":
    main()
