"""Conformance: compiled firewalls in real namespaces allow exactly what the evaluator allows.

Theory of operation: every workload of a policy becomes a namespace host with its addresses
(one IPv4 and/or one IPv6), extra hosts stand for external addresses and the control plane.
Every host serves every TCP/UDP port that the policy's services mention (plus a port just
outside each range); a port bound to a process or unit is served on some hosts by a
responder in that process's own cgroup v2 and on the others by a generic responder, so the
binding is exercised both ways. Each managed workload gets its compiled artefact (nftables,
or iptables + ipset) applied; unmanaged and external hosts run no firewall.

Then every source host probes every other host on every served port and with ICMP echo, all
at once, and each outcome is compared with the evaluator's decision for the same flow
(serving process included): a flow connects exactly when its decision is not `blocked_*`.
The control plane must always be reachable from managed hosts, whatever the policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from bulkhead.dataplane.model import Endpoint, HostContext
from bulkhead.domain.model import Policy
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PortSpec
from bulkhead.lab.netns import HostSpec, NetnsLab
from bulkhead.policy.compile import Compiler
from bulkhead.policy.evaluate import Decision, Evaluator, Flow

GENERIC = "responder"  # process name of the generic responder, as the evaluator sees it
PROTO_NAMES = {6: "tcp", 17: "udp"}


@dataclass(frozen=True)
class Scenario:
    policy: Policy
    extra_hosts: tuple[HostSpec, ...] = ()  # external addresses, the control plane
    control_plane: tuple[str, int] | None = None  # (extra host name, tcp port)
    v4_net: str = "10.0.0.0/8"
    v6_net: str = "fd00::/16"
    # hosts that serve process/unit-bound ports from that process's cgroup (the others serve
    # them generically); None alternates by name order
    bound_hosts: frozenset[str] | None = None


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    dst_ip: str
    proto: int
    port: int
    process: str | None  # serving process on dst (None for ICMP)


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    decision: Decision
    result: str  # open | refused | timeout

    @property
    def expected_open(self) -> bool:
        return not self.decision.decision.startswith("blocked")

    @property
    def agrees(self) -> bool:
        if self.expected_open:
            return self.result == "open"
        return self.result == "timeout"

    def __str__(self) -> str:
        p = self.probe
        svc = f"{PROTO_NAMES.get(p.proto, 'icmp')}/{p.port}"
        return (f"{p.src} -> {p.dst} ({p.dst_ip}) {svc} [{p.process or '-'}]: "
                f"evaluator {self.decision.decision} ({';'.join(self.decision.rules) or '-'}), "
                f"wire {self.result}")


@dataclass
class Report:
    target: str
    outcomes: list[Outcome] = field(default_factory=list)
    control_plane: list[tuple[str, str]] = field(default_factory=list)  # (host, result)

    @property
    def disagreements(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.agrees]

    @property
    def ok(self) -> bool:
        return not self.disagreements and all(r == "open" for _, r in self.control_plane)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.decision.decision] = out.get(o.decision.decision, 0) + 1
        return out

    def summary(self) -> str:
        n = len(self.outcomes)
        opened = sum(o.result == "open" for o in self.outcomes)
        lines = [f"{self.target}: {n} probes, {opened} connected, {n - opened} blocked, "
                 f"{len(self.disagreements)} disagree with the evaluator"]
        lines += [f"  DISAGREE {o}" for o in self.disagreements[:40]]
        lines += [f"  control plane unreachable from {h}: {r}" for h, r in self.control_plane
                  if r != "open"]
        return "\n".join(lines)


def port_universe(policy: Policy) -> dict[int, list[int]]:
    """Per protocol (tcp/udp), the ports worth probing: each spec's ends and its neighbours."""
    specs: list[PortSpec] = []
    for s in policy.services:
        specs += [PortSpec.parse(p) for p in s.ports]
    for rs in policy.rulesets:
        for r in rs.rules:
            specs += [PortSpec.parse(x) for x in r.services if "/" in x or x == "any"]
    out: dict[int, set[int]] = {6: set(), 17: set()}
    for sp in specs:
        if sp.proto in PORTED and sp.lo is not None and sp.hi is not None and sp.proto in out:
            for port in (sp.lo, sp.hi, sp.hi + 1):
                if 0 < port <= 65535:
                    out[sp.proto].add(port)
    out[6].add(9)  # a port no service mentions
    out[17].add(9)
    return {k: sorted(v) for k, v in out.items()}


def bound_ports(policy: Policy) -> dict[tuple[int, int], str]:
    """(proto, port) -> process or unit name, for services bound to one."""
    out: dict[tuple[int, int], str] = {}
    for s in policy.services:
        name = s.process or s.unit
        if not name:
            continue
        for p in s.ports:
            sp = PortSpec.parse(p)
            if sp.proto in PORTED and sp.lo is not None and sp.hi is not None:
                for port in {sp.lo, sp.hi}:
                    out[(sp.proto, port)] = name
    return out


def _hosts(sc: Scenario) -> list[HostSpec]:
    out = []
    for w in sc.policy.workloads:
        v4 = [ip for ip in w.ips if ":" not in ip]
        v6 = [ip for ip in w.ips if ":" in ip]
        if len(v4) > 1 or len(v6) > 1:
            raise ValueError(f"workload {w.name}: the lab gives a host one address per family")
        out.append(HostSpec(w.name, v4[0] if v4 else None, v6[0] if v6 else None))
    return out + list(sc.extra_hosts)


class Conformance:
    """A lab built once for a scenario; `check(policy, target)` applies and probes."""

    def __init__(self, lab: NetnsLab, scenario: Scenario) -> None:
        self.lab = lab
        self.sc = scenario
        self.hosts = {h.name: h for h in _hosts(scenario)}
        self.universe = port_universe(scenario.policy)
        self.bound = bound_ports(scenario.policy)
        # which process serves (proto, port) on each host
        self.serving: dict[str, dict[tuple[int, int], str]] = {}

    @classmethod
    def hosts_of(cls, scenario: Scenario) -> list[HostSpec]:
        return _hosts(scenario)

    def serve(self) -> None:
        for i, name in enumerate(sorted(self.hosts)):
            plan: dict[tuple[int, int], str] = {}
            for proto, ports in self.universe.items():
                for port in ports:
                    bound = self.bound.get((proto, port))
                    here = (name in self.sc.bound_hosts if self.sc.bound_hosts is not None
                            else i % 2 == 0)
                    plan[(proto, port)] = bound if bound and here else GENERIC
            if self.sc.control_plane and name == self.sc.control_plane[0]:
                plan[(6, self.sc.control_plane[1])] = GENERIC
            self.serving[name] = plan
            by_proc: dict[str, tuple[list[int], list[int]]] = {}
            for (proto, port), proc in plan.items():
                tcp, udp = by_proc.setdefault(proc, ([], []))
                (tcp if proto == 6 else udp).append(port)
            for proc, (tcp, udp) in sorted(by_proc.items()):
                self.lab.serve(name, tcp=tcp, udp=udp,
                               cgroup=None if proc == GENERIC else proc)

    def context(self, policy: Policy) -> HostContext:
        cp: tuple[Endpoint, ...] = ()
        if self.sc.control_plane:
            h = self.hosts[self.sc.control_plane[0]]
            cp = tuple(Endpoint(a, self.sc.control_plane[1]) for a in (h.ipv4, h.ipv6) if a)
        names = {s.process or s.unit for s in policy.services if s.process or s.unit}
        cgroups = {n: (self.lab.cgroup_path(n), self.lab.cgroup_level(n))
                   for n in sorted(x for x in names if x)}
        return HostContext(control_plane=cp, cgroups=cgroups)

    def apply(self, policy: Policy, target: str,
              render: Callable[[object, HostContext], None] | None = None) -> None:
        ctx = self.context(policy)
        compiled = Compiler(policy).compiled
        for w in policy.workloads:
            cw = compiled[w.name]
            if target == "nftables":
                from bulkhead.dataplane.nftables import remove_nftables, render_nftables

                script = render_nftables(cw, ctx) if w.managed else remove_nftables(ctx)
                self.lab.nft(w.name, script)
            elif target == "iptables":
                from bulkhead.dataplane.iptables import remove_iptables, render_iptables

                art = render_iptables(cw, ctx) if w.managed else remove_iptables(ctx)
                apply_iptables(self.lab, w.name, art)
            else:
                raise ValueError(f"unknown target {target!r}")

    def clear(self, target: str) -> None:
        ctx = HostContext()
        for w in self.sc.policy.workloads:
            if target == "nftables":
                from bulkhead.dataplane.nftables import remove_nftables

                self.lab.nft(w.name, remove_nftables(ctx))
            else:
                from bulkhead.dataplane.iptables import remove_iptables

                apply_iptables(self.lab, w.name, remove_iptables(ctx))

    def probes(self, policy: Policy) -> list[Probe]:
        names = [w.name for w in policy.workloads]
        extra = [h.name for h in self.sc.extra_hosts
                 if not (self.sc.control_plane and h.name == self.sc.control_plane[0])]
        out = []
        for src in names + extra:
            for dst in names + extra:
                if src == dst or (src in extra and dst in extra):
                    continue
                s, d = self.hosts[src], self.hosts[dst]
                for fam_s, fam_d, icmp in ((s.ipv4, d.ipv4, 1), (s.ipv6, d.ipv6, 58)):
                    if not fam_s or not fam_d:
                        continue
                    for (proto, port), proc in sorted(self.serving[dst].items()):
                        out.append(Probe(src, dst, fam_d, proto, port, proc))
                    out.append(Probe(src, dst, fam_d, icmp, 8 if icmp == 1 else 128, None))
        return out

    def check(self, policy: Policy, target: str, *, timeout: float = 0.8) -> Report:
        """Apply `policy` (same workloads and addresses as the scenario's) and probe."""
        self.apply(policy, target)
        ev = Evaluator(policy)
        probes = self.probes(policy)
        by_src: dict[str, list[Probe]] = {}
        for p in probes:
            by_src.setdefault(p.src, []).append(p)
        cp_host = self.sc.control_plane
        cp_probes: dict[str, list[tuple[str, str, int]]] = {}
        if cp_host:
            h = self.hosts[cp_host[0]]
            for w in policy.workloads:
                if w.managed:
                    cp_probes[w.name] = [(a, "tcp", cp_host[1]) for a in (h.ipv4, h.ipv6)
                                         if a and any((":" in a) == (":" in ip) for ip in w.ips)]

        def run(src: str) -> tuple[list[str], list[str]]:
            ps = by_src.get(src, [])
            wire = [(p.dst_ip, _probe_proto(p), p.port) for p in ps]
            cps = cp_probes.get(src, [])
            results = self.lab.probe(src, wire + cps, timeout=timeout)
            return results[:len(wire)], results[len(wire):]

        sources = sorted(set(by_src) | set(cp_probes))
        report = Report(target)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for src, (res, cp_res) in zip(sources, pool.map(run, sources), strict=True):
                for p, r in zip(by_src.get(src, []), res, strict=True):
                    src_ip = _src_ip(self.hosts[src], p.dst_ip)
                    flow = Flow(src_ip, p.dst_ip, p.proto, p.port, process=p.process)
                    report.outcomes.append(Outcome(p, ev.decide(flow), r))
                report.control_plane += [(src, r) for r in cp_res]
        self._recheck(report, max(3.0, timeout * 4))
        return report

    def _recheck(self, report: Report, timeout: float) -> None:
        """Probe every disagreement (and unreachable control plane) once more with a longer
        timeout: on a loaded machine a connection that is allowed can be slower than the
        first pass's timeout; one that is dropped times out again."""
        again = [i for i, o in enumerate(report.outcomes) if not o.agrees]
        by_src: dict[str, list[int]] = {}
        for i in again:
            by_src.setdefault(report.outcomes[i].probe.src, []).append(i)
        for src, idxs in by_src.items():
            wire = [(report.outcomes[i].probe.dst_ip, _probe_proto(report.outcomes[i].probe),
                     report.outcomes[i].probe.port) for i in idxs]
            for i, r in zip(idxs, self.lab.probe(src, wire, timeout=timeout), strict=True):
                report.outcomes[i] = replace(report.outcomes[i], result=r)
        if self.sc.control_plane:
            host, port = self.sc.control_plane
            h = self.hosts[host]
            fixed = []
            for src, r in report.control_plane:
                if r != "open":  # every address the source can reach must connect
                    me = self.hosts[src]
                    addrs = [a for a, mine in ((h.ipv4, me.ipv4), (h.ipv6, me.ipv6))
                             if a and mine]
                    res = self.lab.probe(src, [(a, "tcp", port) for a in addrs],
                                         timeout=timeout)
                    r = next((x for x in res if x != "open"), "open")
                fixed.append((src, r))
            report.control_plane = fixed


def _probe_proto(p: Probe) -> str:
    if p.proto in ICMP_PROTOS:
        return "icmp" if p.proto == 1 else "icmpv6"
    return PROTO_NAMES[p.proto]


def _src_ip(h: HostSpec, dst_ip: str) -> str:
    v6 = ipaddress.ip_address(dst_ip).version == 6
    ip = h.ipv6 if v6 else h.ipv4
    assert ip is not None
    return ip


def apply_iptables(lab: NetnsLab, host: str, art: object) -> None:
    """ipset first (rules reference sets), then both families, each in one transaction."""
    from bulkhead.dataplane.iptables import IptablesArtifact, restore_commands

    assert isinstance(art, IptablesArtifact)
    for argv, text in restore_commands(art):
        lab.run(host, argv, input=text)


def with_enforcement(policy: Policy, states: Sequence[str] | str,
                     names: Iterable[str] | None = None) -> Policy:
    """The policy with managed workloads (or `names`) set to the given state(s), cycling."""
    if isinstance(states, str):
        states = [states]
    chosen = set(names) if names is not None else None
    out = []
    i = 0
    for w in policy.workloads:
        if w.managed and (chosen is None or w.name in chosen):
            out.append(replace(w, enforcement=states[i % len(states)]))  # type: ignore[arg-type]
            i += 1
        else:
            out.append(w)
    return replace(policy, workloads=tuple(out))
