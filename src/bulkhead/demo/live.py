"""The demo as root: a lab of network namespaces with real services, agents and traffic, a
local control plane, and every step through its public API - the same calls the console and
scripts make."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bulkhead.demo.story import Probe, Summary, allowed, probe_table, reached, step
from bulkhead.policy.fileformat import loads_policy

NOT_ALLOWED = ("potentially_blocked", "blocked")


def _wait(console: Console, seconds: float, what: str,
          tick: Callable[[], str] | None = None) -> None:
    """Sleep `seconds` with a progress bar (and a live figure from `tick`)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(what, total=seconds)
        start = time.monotonic()
        while (done := time.monotonic() - start) < seconds:
            text = what if tick is None else f"{what} - {tick()}"
            bar.update(task, completed=done, description=text)
            time.sleep(min(1.0, seconds - done))
        bar.update(task, completed=seconds)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _map(lab: Any, level: str) -> list[dict[str, Any]]:
    data = lab.api("GET", f"/traffic/map?level={level}")
    edges: list[dict[str, Any]] = data.get("items", [])
    return edges


def _count(lab: Any) -> tuple[int, int]:
    """(flow records, connections) at the control plane."""
    edges = _map(lab, "workload")
    return sum(int(e.get("flows", 0)) for e in edges), \
        sum(int(e.get("connections", 0)) for e in edges)


def _in_sync(lab: Any) -> tuple[int, int]:
    """(agents that applied the active policy in full enforcement, paired agents)."""
    agents = [a for a in lab.api("GET", "/agents?state=paired&limit=5000") or []]
    return sum(1 for a in agents if a.get("in_sync") and
               a.get("applied_enforcement") == "full"), len(agents)


def run_live(topology_path: Path, console: Console, *, traffic_s: float = 40.0,
             lab_dir: Path | None = None) -> tuple[Summary, Any]:
    """Run the story; returns the summary and the lab (still up: the caller takes it down)."""
    from bulkhead.lab.runner import Lab
    from bulkhead.lab.topology import load_topology

    started = time.monotonic()
    topo = load_topology(str(topology_path))
    s = Summary(mode="live", topology=topo.name, hosts=len(topo.hosts))
    lab = Lab(lab_dir)

    step(console, 1, f"Start the control plane and the '{topo.name}' lab "
                     f"({len(topo.hosts)} hosts)")
    with console.status("building the lab") as status:
        lab.up(topology_path, labels=False, progress=lambda m: status.update(m))
    st = lab.status()
    t = Table("host", "address", "agent", "enforcement")
    for h in st.get("hosts", []):
        t.add_row(str(h.get("name")), str(h.get("ip")), str(h.get("agent") or "-"),
                  str(h.get("enforcement") or "-"))
    console.print(t)
    console.print(f"control plane at {lab.server_url}; every agent reported in")

    step(console, 2, f"Visibility: let traffic flow for {traffic_s:g} s (nothing is blocked)")
    learn_start = time.time()
    _wait(console, traffic_s * 2 / 3, "recording traffic",
          lambda: f"{_count(lab)[0]:,} flow records")
    train_until = time.time()
    _wait(console, traffic_s / 3, "recording later traffic (held out to measure the policy)",
          lambda: f"{_count(lab)[0]:,} flow records")
    time.sleep(3)  # the agents' last window reaches the control plane
    s.flows_seen, s.connections_seen = _count(lab)
    console.print(f"{s.flows_seen:,} flow records ({s.connections_seen:,} connections) "
                  f"since {time.strftime('%H:%M:%S', time.localtime(learn_start))}")

    step(console, 3, "Import labels (CMDB export)")
    lab.import_labels()
    workloads = lab.api("GET", "/workloads?limit=1000")
    items = workloads.get("items", []) if isinstance(workloads, dict) else workloads
    s.labels_imported = sum(1 for w in items if w.get("labels"))
    console.print(f"{s.labels_imported} workloads labelled")

    step(console, 4, "The application dependency map")
    edges = _map(lab, "app,env")
    s.edges = len(edges)
    t = Table("from", "to", "services", "connections", title=f"{s.edges} edges (top 15)")
    for e in sorted(edges, key=lambda e: -int(e.get("connections", 0)))[:15]:
        t.add_row(str(e.get("src")), str(e.get("dst")), str(e.get("services")),
                  f"{e.get('connections', 0):,}")
    console.print(t)

    step(console, 5, "Generate policy from what was recorded")
    gen = lab.api("POST", "/generate", json_body={"noise": [], "train_until": _iso(train_until)},
                  timeout=120)
    t = Table("candidate", "rules", "coverage (train)", "coverage (later)", "over-permission")
    best: dict[str, Any] = {}
    for c in gen["candidates"]:
        r = c["report"]
        mark = " [bold](recommended)" if c["name"] == gen["recommended"] else ""
        if c["name"] == gen["recommended"]:
            best = c
        t.add_row(c["name"] + mark, str(r["rules"]), f"{r['coverage_train']:.1%}",
                  f"{r['coverage_test']:.1%}", f"{r['over_permission']:.1%}")
    console.print(t)
    rep = best["report"]
    s.candidate, s.granularity = best["name"], best["granularity"]
    s.coverage_train, s.coverage_test = float(rep["coverage_train"]), float(rep["coverage_test"])
    s.over_permission = float(rep["over_permission"])
    # measured on held-out traffic; the policy to enforce learns from the whole period
    full = lab.api("POST", "/generate", json_body={"noise": []}, timeout=120)
    final = next((c for c in full["candidates"] if c["name"] == s.candidate),
                 next(c for c in full["candidates"] if c["name"] == full["recommended"]))
    s.rules = int(final["report"]["rules"])
    lab.api("POST", "/generate/apply", json_body={k: final.get(k, []) for k in
                                                  ("rulesets", "ip_lists", "services", "tests")})
    console.print(f"draft: {s.rules} rules added")

    step(console, 6, "Test the draft against the recorded traffic (what-if)")
    whatif = lab.api("POST", "/traffic/what-if",
                     json_body={"policy": "draft", "summary": True, "limit": 1}, timeout=120)
    summ = whatif["summary"]
    s.legit_flows_checked = int(summ["flows"])
    s.legit_would_block = sum(int(v["flows"]) for d, v in summ["decisions"].items()
                              if d.startswith(NOT_ALLOWED))
    console.print(f"{s.legit_flows_checked:,} recorded flows: {s.legit_would_block} would be "
                  "blocked by the draft")

    step(console, 7, "Attack from a compromised host, in visibility")
    before = [Probe(r.source, r.target, r.port, r.result)
              for a in topo.attacks for r in lab.attack(a.name)]
    console.print(probe_table("the attack reached", [p for p in before if p.reached]))

    step(console, 8, "Provision, then switch every workload to full enforcement")
    version = lab.api("POST", "/policy/provision",
                      json_body={"note": f"generated from observed traffic ({s.candidate})"})
    s.provisioned_version = int(version["id"])
    lab.api("POST", "/workloads/enforcement", json_body={"enforcement": "full", "labels": {}})
    deadline = time.monotonic() + 60
    with console.status("waiting for every agent to apply the policy") as status:
        while True:
            ok, total = _in_sync(lab)
            status.update(f"{ok}/{total} agents enforce the new policy")
            if ok == total or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    s.agents_enforcing, s.agents = ok, total
    console.print(f"version {s.provisioned_version} enforced by {ok}/{total} agents")

    step(console, 9, "Legitimate traffic, then the same attack, under full enforcement")
    legit = lab.probe_traffic()
    s.legit_probes = len(legit)
    s.legit_failed = [{"from": r.source, "to": r.target, "port": r.port, "result": r.result}
                      for r in legit if not r.connected]
    console.print(f"{s.legit_probes - len(s.legit_failed)}/{s.legit_probes} declared traffic "
                  "edges connect")
    after = [Probe(r.source, r.target, r.port, r.result)
             for a in topo.attacks for r in lab.attack(a.name)]
    console.print(probe_table("the attack reached", [p for p in after if p.reached]))
    s.attack_before, s.attack_after = reached(before), reached(after)
    import httpx

    active = httpx.get(f"{lab.server_url}/api/v1/policy/export?version=active",
                       headers={"Authorization": f"Bearer {lab.api_key}"}, timeout=30)
    active.raise_for_status()
    hits = [p for p in after if p.reached]
    ips = {h.name: h.ip for h in topo.hosts}
    rows = []
    for p in hits:  # p.port is "tcp/22", or "icmp"
        proto, _, port = p.port.partition("/")
        rows.append((ips[p.source], ips.get(p.target, p.target.removeprefix("external:")),
                     proto, int(port) if port else -1))
    s.attack_after_allowed = sum(allowed(loads_policy(active.text, source="active policy"),
                                         rows))
    server = lab.state()["server"]
    login = f"user {server.get('user', 'admin')}, password {server['password']}" \
        if server.get("password") else "log in with your own account"
    s.console_url = f"{lab.server_url}/console/ ({login})"
    s.seconds = time.monotonic() - started
    return s, lab
