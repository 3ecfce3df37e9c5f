"""Evaluator figures: the batch evaluator on 1,000,000 flows against 1,000 rules over 10,000
workloads (set-up timed separately), and the scalar reference evaluator for comparison.

    python bench/bench_evaluate.py [--workloads N] [--rules N] [--flows N] [--scalar-flows N]
                                   [--repeat N] [--no-strings] [--profile]

Wall-clock and CPU time are both printed: on a shared machine the CPU time of this process is
the steadier figure. Every flow the scalar evaluator decides is also checked against the batch
result.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulkhead.policy.batch import BatchEvaluator
from bulkhead.policy.evaluate import Evaluator, Flow
from bulkhead.policy.resolve import resolve
from synth import make_flows, make_policy


class Timer:
    def __enter__(self) -> Timer:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def rate(self, n: int) -> str:
        return (f"{n / self.wall:>12,.0f} flows/s wall ({self.wall:.3f} s), "
                f"{n / self.cpu:,.0f} flows/s CPU ({self.cpu:.3f} s)")


def dotted(values: np.ndarray) -> list[str]:
    v = values.astype(np.int64)
    parts = [(v >> s) & 255 for s in (24, 16, 8, 0)]
    return [f"{a}.{b}.{c}.{d}" for a, b, c, d in zip(*(p.tolist() for p in parts), strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=1_000)
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--scalar-flows", type=int, default=20_000,
                    help="flows for the scalar evaluator (0 to skip it)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-strings", action="store_true", help="skip the string-address run")
    ap.add_argument("--profile", action="store_true", help="cProfile one batch evaluation")
    args = ap.parse_args()

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, python "
          f"{platform.python_version()}, numpy {np.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {load[0]:.2f}")

    with Timer() as t:
        policy = make_policy(args.workloads, args.rules, seed=args.seed)
    print(f"synthetic policy: {len(policy.workloads):,} workloads, "
          f"{sum(len(r.rules) for r in policy.rulesets):,} rules ({t.wall:.2f} s to build)")
    with Timer() as t:
        cols = make_flows(policy, args.flows, seed=args.seed)
    print(f"synthetic flows: {args.flows:,} ({t.wall:.2f} s to build)")

    with Timer() as t:
        resolved = resolve(policy)
    print(f"\nresolve: {len(resolved.instances):,} rule instances in {t.wall:.3f} s")
    with Timer() as t:
        batch = BatchEvaluator(resolved)
    print(f"batch set-up: {t.wall:.3f} s wall, {t.cpu:.3f} s CPU")

    n = args.flows
    with Timer() as t:
        result = batch.evaluate(cols.src, cols.dst, cols.proto, cols.port)
    print(f"batch, first call (memo tables cold): {t.rate(n)}")
    best: Timer | None = None
    for _ in range(args.repeat):
        with Timer() as t:
            batch.evaluate(cols.src, cols.dst, cols.proto, cols.port)
        best = t if best is None or t.wall < best.wall else best
    assert best is not None
    print(f"batch, best of {args.repeat} (uint32 addresses): {best.rate(n)}")
    with Timer() as t:
        fresh = BatchEvaluator(resolved)
        fresh.evaluate(cols.src, cols.dst, cols.proto, cols.port)
    print(f"batch, set-up + first call: {t.rate(n)}")
    print(f"  classes: {batch._cons.n} consumer, {batch._prov.n} provider, {batch._svc.n} "
          f"service, {batch._pair.n} pair, {batch._final.n} final; "
          f"{len(result.patterns)} rule-id patterns")

    if not args.no_strings:
        src_s, dst_s = dotted(cols.src), dotted(cols.dst)
        with Timer() as t:
            by_text = batch.evaluate(src_s, dst_s, cols.proto, cols.port)
        print(f"batch, string addresses: {t.rate(n)}")
        assert np.array_equal(by_text.decision, result.decision)

    mix = Counter(result.decisions())
    print("\ndecisions: " + ", ".join(f"{k} {v / n:.1%}" for k, v in mix.most_common()))

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        batch.evaluate(cols.src, cols.dst, cols.proto, cols.port)
        prof.disable()
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)

    m = min(args.scalar_flows, n)
    if m:
        with Timer() as t:
            scalar = Evaluator(resolved)
        print(f"\nscalar set-up: {t.wall:.2f} s wall, {t.cpu:.2f} s CPU")
        src_s, dst_s = dotted(cols.src[:m]), dotted(cols.dst[:m])
        flows = [Flow(src_s[i], dst_s[i], int(cols.proto[i]),
                      None if cols.port[i] < 0 else int(cols.port[i])) for i in range(m)]
        with Timer() as t:
            decided = [scalar.decide(f) for f in flows]
        print(f"scalar ({m:,} flows): {t.rate(m)}")
        bad = sum(1 for i, d in enumerate(decided) if d != result.row(i))
        print(f"batch == scalar on {m:,} flows: {'yes' if not bad else f'NO, {bad} differ'}")
        print(f"speed-up (steady state, wall): {(n / best.wall) / (m / t.wall):,.0f}x")
        if bad:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
