"""`bulkhead demo`: the policy walk-through on the shipped example, ending (as root) with the
compiled policy enforced in real network namespaces and checked against the evaluator."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bulkhead.domain.errors import PolicyError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _step(console: Console, n: int, title: str) -> None:
    console.rule(f"[bold]{n}. {title}")


def run_demo(examples: Path = EXAMPLES, *, live: bool | None = None) -> int:
    from bulkhead.dataplane.model import Endpoint, HostContext
    from bulkhead.flows.csvflows import read_flows_file
    from bulkhead.policy.batch import BatchEvaluator
    from bulkhead.policy.compile import Compiler
    from bulkhead.policy.diff import diff
    from bulkhead.policy.fileformat import load_policy
    from bulkhead.policy.intent import run_tests
    from bulkhead.policy.lint import lint

    console = Console()
    shop = examples / "policies" / "shop.yaml"
    if not shop.exists():
        console.print(f"[red]example policy not found at {shop}[/] (run from a source checkout)")
        return 1
    try:
        policy = load_policy(str(shop))
        v2 = load_policy(str(examples / "policies" / "shop-v2.yaml"))
        flows = read_flows_file(str(examples / "flows" / "shop.csv"))
    except PolicyError as err:
        console.print(f"[red]{err}")
        return 1

    _step(console, 1, f"Load and validate {shop.name}")
    t = Table("workload", "addresses", "labels", "managed", "enforcement")
    for w in policy.workloads:
        t.add_row(w.name, " ".join(w.ips), " ".join(f"{k}={v}" for k, v in w.labels),
                  "yes" if w.managed else "no", w.enforcement)
    console.print(t)
    rules = sum(len(rs.rules) for rs in policy.rulesets)
    console.print(f"{len(policy.rulesets)} rulesets, {rules} rules, {len(policy.tests)} tests")

    _step(console, 2, "Lint")
    for f in lint(policy):
        console.print(f"{f.severity}: {f.code}: {f}")

    _step(console, 3, "Intent tests inside the file")
    outcomes = run_tests(policy)
    for o in outcomes:
        console.print(("[green]PASS[/] " if o.passed else "[red]FAIL[/] ") +
                      f"{o.test.source} -> {o.test.target} {o.test.port} expect {o.test.expect}")

    _step(console, 4, "Decide recorded flows")
    res = BatchEvaluator(policy).evaluate(flows.src_ip, flows.dst_ip, flows.proto,
                                         flows.dst_port, process=flows.process)
    t = Table("src", "dst", "port", "process", "decision", "side", "rules")
    for i, row in enumerate(flows.rows):
        d = res.row(i)
        colour = "green" if d.decision.startswith("allowed") else (
            "red" if d.decision.startswith("blocked") else "yellow")
        t.add_row(flows.src_ip[i], flows.dst_ip[i], f"{row[2]}/{row[3]}", row[4] or "-",
                  f"[{colour}]{d.decision}", d.side or "-", ";".join(d.rules) or "-")
    console.print(t)

    _step(console, 5, "Semantic diff against the next version (shop-v2.yaml)")
    console.print(diff(policy, v2).to_text())

    _step(console, 6, "Compile db-1 for nftables")
    from bulkhead.dataplane.nftables import render_nftables

    compiled = Compiler(policy).compiled
    ctx = HostContext(control_plane=(Endpoint("10.0.0.2", 8443),))
    console.print(render_nftables(compiled["db-1"], ctx), markup=False, highlight=False)

    if live is None:
        live = os.geteuid() == 0
    if not live:
        why = "" if os.geteuid() == 0 else " (it needs root, nftables and iproute2)"
        console.print(f"[yellow]Skipping live enforcement in network namespaces{why}.")
        return 0 if all(o.passed for o in outcomes) else 1
    return _live(console, policy) or (0 if all(o.passed for o in outcomes) else 1)


def _live(console: Console, policy: object) -> int:
    from bulkhead.domain.model import Policy
    from bulkhead.lab.conformance import Conformance, Scenario, with_enforcement
    from bulkhead.lab.netns import HostSpec, NetnsLab, privileged_available

    assert isinstance(policy, Policy)
    _step(console, 7, "Enforce in real network namespaces and probe every connection")
    reason = privileged_available()
    if reason:
        console.print(f"[yellow]Live enforcement unavailable: {reason}")
        return 0
    scenario = Scenario(policy, (HostSpec("cp", "10.250.0.1"),), ("cp", 8443),
                        bound_hosts=frozenset({"db-1", "db-dev"}))
    failed = 0
    with NetnsLab(Conformance.hosts_of(scenario), v4_net=scenario.v4_net,
                  v6_net=scenario.v6_net) as lab:
        c = Conformance(lab, scenario)
        c.serve()
        console.print(f"{len(c.hosts)} hosts up, each serving "
                      f"{sum(len(v) for v in c.universe.values())} ports")
        for label, pol in (("as written (mixed states)", policy),
                           ("every managed workload in full enforcement",
                            with_enforcement(policy, "full"))):
            t0 = time.perf_counter()
            report = c.check(pol, "nftables")
            took = time.perf_counter() - t0
            console.print(f"[bold]{label}[/]: {report.summary()} ({took:.1f} s)")
            counts = Counter(o.decision.decision for o in report.outcomes)
            console.print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
            failed += 0 if report.ok else 1
            web = [o for o in report.outcomes if o.probe.src == "web-1"]
            reached = sorted({f"{o.probe.dst}:{o.probe.port}" for o in web
                              if o.result == "open"})
            console.print(f"  from a compromised web-1, {len(reached)} of {len(web)} "
                          f"probes connect: {', '.join(reached[:12])}"
                          f"{' …' if len(reached) > 12 else ''}")
    console.print("[green]Every connection matched the evaluator." if not failed else
                  "[red]Some connections disagreed with the evaluator.")
    return 1 if failed else 0


def demo(live: bool = typer.Option(None, "--live/--no-live",
                                   help="Enforce in network namespaces (default: when root)."),
         exit_: bool = typer.Option(True, "--exit", help="Exit when done (always, for now).")
         ) -> None:
    """Walk through policy as code on the example shop, then enforce it for real."""
    del exit_
    raise typer.Exit(run_demo(live=live))
