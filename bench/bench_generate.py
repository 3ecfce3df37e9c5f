"""Policy generation figures.

(a) On the lab's example topologies (`examples/topologies/*.yaml`, flows from
    `bulkhead.lab.synth`) and on the generator's synthetic estate: train on one window, test on
    the next; the default candidate against the exact-replay baseline (`replay_baseline.py`):
    held-out coverage, over-permission, rules.
(b) Scale: 1,000,000 flows over ~5,000 workloads → candidate policies, timed.

    python bench/bench_generate.py [--train S] [--test S] [--flows N] [--skip-scale]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulkhead.domain.model import Policy
from bulkhead.domain.ports import parse_proto
from bulkhead.generate import FlowColumns, Options, generate
from bulkhead.generate import synthetic as syn
from bulkhead.generate.generator import Context
from bulkhead.generate.measure import measure_draft
from replay_baseline import replay

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


def _columns(rows: list[dict[str, object]]) -> FlowColumns:
    return FlowColumns([str(r["src_ip"]) for r in rows], [str(r["dst_ip"]) for r in rows],
                       np.asarray([parse_proto(r["proto"]) for r in rows], np.int64),  # type: ignore[arg-type]
                       np.asarray([r["dst_port"] for r in rows], np.int64),
                       [r.get("process") for r in rows],  # type: ignore[misc]
                       np.asarray([r["ts"] for r in rows], np.float64),
                       np.asarray([r.get("count", 1) for r in rows], np.int64))


def _take(f: FlowColumns, mask: np.ndarray) -> FlowColumns:
    idx = np.flatnonzero(mask)
    return FlowColumns([f.src_ip[i] for i in idx], [f.dst_ip[i] for i in idx],
                       np.asarray(f.proto)[idx], np.asarray(f.dst_port)[idx],
                       None if f.process is None else [f.process[i] for i in idx],
                       np.asarray(f.ts)[idx], np.asarray(f.count)[idx])


def compare(name: str, policy: Policy, flows: FlowColumns, cut: float) -> dict[str, object]:
    t = time.perf_counter()
    result = generate(policy, flows, Options(train_until=cut))
    took = time.perf_counter() - t
    best = result.full_report()
    train = _take(flows, np.asarray(flows.ts) <= cut)
    base_draft = replay(policy, train)
    ctx = Context(policy, flows, Options(train_until=cut))
    base = measure_draft(ctx, base_draft)
    base_rules = sum(len(rs.rules) for rs in base_draft.rulesets)
    return {"name": name, "workloads": len(policy.workloads), "flows": len(flows),
            "pick": best["candidate"], "cov": best["coverage_test"],
            "over": best["over_permission"], "rules": best["rules"], "b_cov": base["coverage_test"],
            "b_over": base["over_permission"], "b_rules": base_rules, "s": took}


def _fmt(x: object) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def part_a(train_s: float, test_s: float) -> None:
    rows = []
    topo_dir = ROOT / "examples" / "topologies"
    try:
        from bulkhead.lab.synth import synthesize_flows
        from bulkhead.lab.topology import load_topology
    except ImportError:
        synthesize_flows = load_topology = None  # type: ignore[assignment]
    if load_topology is not None:
        for path in sorted(topo_dir.glob("*.yaml")):
            topo = load_topology(str(path))
            recs = (synthesize_flows(topo, start=T0, duration_s=train_s, seed=1)
                    + synthesize_flows(topo, start=T0 + train_s, duration_s=test_s, seed=2))
            rows.append(compare(path.stem, topo.to_policy(), _columns(recs), T0 + train_s))
    policy, intents = syn.estate(apps=12, envs=("prod", "staging"), replicas=3)
    f = syn.flows(policy, intents, 200_000, start=T0, duration=2 * 86400, seed=3)
    rows.append(compare("synthetic-24-apps", policy, f, T0 + 86400))
    print(f"(a) train {train_s:.0f} s, test {test_s:.0f} s (synthetic estate: 1 day + 1 day)")
    head = ("topology", "workloads", "flows", "default", "cov_test", "over", "rules",
            "base_cov", "base_over", "base_rules", "time_s")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(_fmt(r[k]) for k in ("name", "workloads", "flows", "pick", "cov", "over",
                                              "rules", "b_cov", "b_over", "b_rules", "s")))


def part_b(n: int) -> None:
    policy, intents = syn.estate(apps=250, replicas=5, unlabelled=False)
    f = syn.flows(policy, intents, n, start=T0, duration=2 * 86400, seed=4)
    t = time.perf_counter()
    result = generate(policy, f, Options(train_until=T0 + 86400))
    took = time.perf_counter() - t
    rep = result.full_report()
    print(f"(b) {len(f):,} flows over {len(policy.workloads):,} workloads -> "
          f"{len(result.candidates)} candidates in {took:.1f} s; recommended {rep['candidate']}: "
          f"{rep['rules']} rules, coverage test {rep['coverage_test']:.3f}, over-permission "
          f"{rep['over_permission']:.3f} (sampled: {rep['over_permission_sampled']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=float, default=600.0, help="lab train window, seconds")
    ap.add_argument("--test", type=float, default=600.0, help="lab test window, seconds")
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--skip-scale", action="store_true")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    part_a(args.train, args.test)
    if not args.skip_scale:
        part_b(args.flows)


if __name__ == "__main__":
    main()
