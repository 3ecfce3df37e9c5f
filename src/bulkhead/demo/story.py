"""What the demo learned and proved, in one record both stories fill in, and how it is shown.

The summary is the demo's contract with its tests (`bulkhead demo --exit --summary FILE`):
`contained` and `legitimate_ok` are the two claims, each backed by the figures beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bulkhead.domain.model import Policy

DEFAULT_TOPOLOGY = "shop.yaml"


def examples_dir() -> Path:
    """`examples/` of a source checkout (the demo's topologies live there)."""
    return Path(__file__).resolve().parents[3] / "examples"


@dataclass
class Probe:
    source: str
    target: str
    port: str
    result: str  # open | refused | timeout (live); open | closed | blocked (recorded)

    @property
    def reached(self) -> bool:
        return self.result == "open"


@dataclass
class Summary:
    mode: str  # "live" (namespaces, agents, nftables) or "recorded" (flows, the evaluator)
    topology: str
    hosts: int = 0
    flows_seen: int = 0  # flow records (live: at the control plane; recorded: synthesised)
    connections_seen: int = 0
    edges: int = 0  # distinct app/env-level edges on the map
    labels_imported: int = 0
    candidate: str = ""
    granularity: str = ""
    rules: int = 0
    coverage_train: float = 0.0
    coverage_test: float = 0.0
    over_permission: float = 0.0
    legit_would_block: int = 0  # recorded flows the draft would block
    legit_flows_checked: int = 0
    provisioned_version: int | None = None
    agents: int | None = None  # live: paired agents, and those that applied the policy in
    agents_enforcing: int | None = None  # full enforcement before the probes of step 9
    legit_probes: int = 0  # legitimate edges probed after enforcement
    legit_failed: list[dict[str, str]] = field(default_factory=list)
    attack_before: list[dict[str, str]] = field(default_factory=list)  # reached before
    attack_after: list[dict[str, str]] = field(default_factory=list)  # reached after
    attack_after_allowed: int = 0  # of attack_after, flows the policy allows on purpose
    console_url: str | None = None
    seconds: float = 0.0

    @property
    def contained(self) -> bool:
        """The attack reached less after enforcement, and only what the policy allows."""
        return (len(self.attack_after) < len(self.attack_before)
                and self.attack_after_allowed == len(self.attack_after))

    @property
    def legitimate_ok(self) -> bool:
        return self.legit_would_block == 0 and not self.legit_failed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contained": self.contained, "legitimate_ok": self.legitimate_ok}

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)


def allowed(policy: Policy, rows: list[tuple[str, str, str, int]]) -> list[bool]:
    """Whether each (src_ip, dst_ip, proto name, port; -1 for none) is allowed with every
    workload in full enforcement (the evaluator decides, as the firewalls would)."""
    from bulkhead.domain.ports import PROTO_NUMBERS
    from bulkhead.policy.batch import BatchEvaluator
    from bulkhead.policy.evaluate import as_fully_enforced

    if not rows:
        return []
    res = BatchEvaluator(as_fully_enforced(policy)).evaluate(
        [r[0] for r in rows], [r[1] for r in rows],
        np.array([PROTO_NUMBERS[r[2]] for r in rows]), np.array([r[3] for r in rows]))
    return [res.row(i).decision.startswith("allowed") for i in range(len(rows))]


def step(console: Console, n: int, title: str) -> None:
    console.rule(f"[bold]{n}. {title}")


def probe_table(title: str, probes: list[Probe]) -> Table:
    t = Table("from", "to", "port", "result", title=title)
    for p in probes:
        colour = "red" if p.reached else "green"
        t.add_row(p.source, p.target, p.port, f"[{colour}]{p.result}")
    return t


def reached(probes: list[Probe]) -> list[dict[str, str]]:
    return [{"from": p.source, "to": p.target, "port": p.port} for p in probes if p.reached]


def render(console: Console, s: Summary) -> None:
    console.rule("[bold]Summary")
    t = Table.grid(padding=(0, 2))
    t.add_row("mode", "live hosts (network namespaces, agents, nftables)" if s.mode == "live"
              else "recorded flows (no root: the evaluator stands in for the firewalls)")
    t.add_row("learned", f"{s.flows_seen:,} flow records ({s.connections_seen:,} connections) "
                         f"from {s.hosts} hosts; {s.edges} application edges; "
                         f"{s.labels_imported} workloads labelled")
    t.add_row("generated", f"{s.rules} rules at '{s.granularity}' granularity "
                           f"(candidate {s.candidate})")
    t.add_row("coverage", f"training {s.coverage_train:.1%}, later traffic {s.coverage_test:.1%}; "
                          f"over-permission {s.over_permission:.1%}")
    t.add_row("tested", f"{s.legit_flows_checked:,} recorded flows: {s.legit_would_block} "
                        "would be blocked")
    if s.provisioned_version is not None:
        on = "" if s.agents is None else f" applied by {s.agents_enforcing}/{s.agents} agents"
        colour = "" if s.agents is None or s.agents_enforcing == s.agents else "[red]"
        t.add_row("provisioned", f"{colour}version {s.provisioned_version}, full enforcement{on}")
    if s.legit_probes:
        t.add_row("legitimate", f"{s.legit_probes - len(s.legit_failed)}/{s.legit_probes} "
                                "declared traffic edges still connect")
    t.add_row("attack", f"reached {len(s.attack_before)} services before, "
                        f"{len(s.attack_after)} after ({s.attack_after_allowed} of them "
                        "allowed by policy)")
    verdict = "[green]contained" if s.contained else "[red]NOT contained"
    legit = "[green]nothing legitimate blocked" if s.legitimate_ok else \
        "[red]legitimate traffic blocked"
    t.add_row("result", f"{verdict}[/]; {legit}")
    if s.console_url:
        t.add_row("console", s.console_url)
    console.print(t)
