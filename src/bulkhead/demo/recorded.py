"""The demo without root: the same story on flows recorded from the topology (synthesised the
way the lab's traffic generator would produce them), with the evaluator standing in for the
hosts' firewalls. Nothing here needs privileges or a network."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bulkhead.demo.story import Probe, Summary, allowed, probe_table, reached, step
from bulkhead.domain.model import Policy

TRAIN_S = 2 * 3600.0  # the "visibility" period the policy is learned from
TEST_S = 3600.0  # later traffic the policy is measured on
WINDOW_S = 60.0  # flow summaries per minute, as agents report them


@dataclass
class Recorded:
    """What the recorded story produced, for its console."""

    before: Policy  # the workloads as found (labelled), no rules
    draft: Policy  # plus the generated rules
    flows: list[dict[str, Any]]


def run_recorded(topology_path: Path, console: Console) -> tuple[Summary, Recorded]:
    from bulkhead.generate.encode import FlowColumns
    from bulkhead.generate.generator import Options, generate
    from bulkhead.lab.synth import synthesize_flows
    from bulkhead.lab.topology import load_topology

    started = time.monotonic()
    topo = load_topology(str(topology_path))
    s = Summary(mode="recorded", topology=topo.name, hosts=len(topo.hosts))

    step(console, 1, f"Visibility: {len(topo.hosts)} hosts of '{topo.name}', traffic recorded")
    t0 = time.time() // WINDOW_S * WINDOW_S - TRAIN_S - TEST_S  # the last three hours
    flows = synthesize_flows(topo, start=t0, duration_s=TRAIN_S + TEST_S, seed=1,
                             window_s=WINDOW_S)
    s.flows_seen = len(flows)
    s.connections_seen = sum(int(f["count"]) for f in flows)
    console.print(f"{s.flows_seen:,} flow summaries ({s.connections_seen:,} connections) over "
                  f"{(TRAIN_S + TEST_S) / 3600:g} h; nothing is blocked in visibility")

    step(console, 2, "Import labels (CMDB export)")
    policy = topo.to_policy(labels=True)
    s.labels_imported = sum(1 for w in policy.workloads if w.labels)
    console.print(f"{s.labels_imported} workloads labelled with "
                  f"{', '.join(policy.label_keys)}")

    step(console, 3, "The application dependency map")
    by_ip = {h.ip: h for h in topo.hosts}

    def group(ip: str) -> str:
        h = by_ip.get(ip)
        if h is None:
            return "internet"
        d = h.label_dict
        return f"{d.get('app', '?')}/{d.get('env', '?')}"

    edges: Counter[tuple[str, str, str]] = Counter()
    for f in flows:
        edges[(group(f["src_ip"]), group(f["dst_ip"]), f"{f['proto']}/{f['dst_port']}")] += \
            int(f["count"])
    s.edges = len(edges)
    t = Table("from", "to", "port", "connections", title=f"{s.edges} edges (top 15)")
    for (a, b, port), n in edges.most_common(15):
        t.add_row(a, b, port, f"{n:,}")
    console.print(t)

    step(console, 4, "Generate policy from the first two hours")
    cols = FlowColumns(
        src_ip=[f["src_ip"] for f in flows], dst_ip=[f["dst_ip"] for f in flows],
        proto=np.array([6 if f["proto"] == "tcp" else 17 if f["proto"] == "udp" else 1
                        for f in flows]),
        dst_port=np.array([f["dst_port"] for f in flows]),
        process=[f["process"] for f in flows], ts=np.array([f["ts"] for f in flows]),
        count=np.array([f["count"] for f in flows]))
    result = generate(policy, cols, Options(train_until=t0 + TRAIN_S, noise=()))
    t = Table("candidate", "rules", "coverage (train)", "coverage (later)", "over-permission")
    for i, c in enumerate(result.candidates):
        mark = " [bold](recommended)" if i == result.recommended else ""
        t.add_row(c.name + mark, str(c.report["rules"]), f"{c.report['coverage_train']:.1%}",
                  f"{c.report['coverage_test']:.1%}", f"{c.report['over_permission']:.1%}")
    console.print(t)
    best = result.candidates[result.recommended]
    s.candidate, s.granularity = best.name, best.granularity
    s.rules = int(best.report["rules"])
    s.coverage_train = float(best.report["coverage_train"])
    s.coverage_test = float(best.report["coverage_test"])
    s.over_permission = float(best.report["over_permission"])
    draft = best.draft

    step(console, 5, "Test the draft against everything recorded")
    rows = [(f["src_ip"], f["dst_ip"], f["proto"], int(f["dst_port"])) for f in flows]
    ok = allowed(draft, rows)
    s.legit_flows_checked = len(rows)
    s.legit_would_block = ok.count(False)
    console.print(f"{s.legit_flows_checked:,} recorded flows: {s.legit_would_block} would be "
                  "blocked under full enforcement")

    step(console, 6, "Attack from a compromised host, before and after enforcement")
    probes: list[tuple[str, str, str, str, int]] = []  # source, target, ip, proto, port
    for attack in topo.attacks:
        for src in attack.sources:
            for target in attack.targets:
                if target == src:
                    continue
                ip = target.removeprefix("external:") if target.startswith("external:") \
                    else topo.host(target).ip
                probes += [(src, target, ip, proto, port) for proto, port in attack.ports]

    def listening(target: str, proto: str, port: int) -> bool:
        return target.startswith("external:") or \
            topo.host(target).serving(proto, port) is not None

    permitted = allowed(draft, [(topo.host(p[0]).ip, p[2], p[3], p[4]) for p in probes])
    before = [Probe(p[0], p[1], f"{p[3]}/{p[4]}",
                    "open" if listening(p[1], p[3], p[4]) else "closed") for p in probes]
    after = [Probe(b.source, b.target, b.port, "open" if b.reached and ok_ else
                   ("blocked" if not ok_ else b.result))
             for b, ok_ in zip(before, permitted, strict=True)]
    console.print(probe_table("reached before (visibility)", [p for p in before if p.reached]))
    console.print(probe_table("reached after (full enforcement)", [p for p in after if p.reached]))
    s.attack_before, s.attack_after = reached(before), reached(after)
    s.attack_after_allowed = len(s.attack_after)  # the evaluator is the firewall here

    step(console, 7, "Legitimate traffic under full enforcement")
    legit: list[tuple[str, str, str, str, int]] = []
    for e in topo.edges:
        for src in e.sources:
            targets = [f"external:{e.external}"] if e.external else list(e.targets_for(src))
            for t_ in targets:
                ip = t_.removeprefix("external:") if t_.startswith("external:") \
                    else topo.host(t_).ip
                legit.append((src, t_, ip, e.proto, e.port))
    ok_legit = allowed(draft, [(topo.host(x[0]).ip, x[2], x[3], x[4]) for x in legit])
    s.legit_probes = len(legit)
    s.legit_failed = [{"from": x[0], "to": x[1], "port": f"{x[3]}/{x[4]}"}
                      for x, good in zip(legit, ok_legit, strict=True) if not good]
    console.print(f"{s.legit_probes - len(s.legit_failed)}/{s.legit_probes} declared edges "
                  "allowed")
    s.seconds = time.monotonic() - started
    return s, Recorded(policy, draft, flows)
