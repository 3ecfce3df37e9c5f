"""Deciding one flow: the reference semantics (docs/policy-semantics.md §3).

`Evaluator(policy)` indexes the resolved rule instances by workload once; `decide(flow)` is then
a pure function of the flow. It is the oracle that the batch evaluator and every compiler are
tested against, so it stays simple: find the matching instances, compute the raw verdict once
(both sides look at the same instances), soften it per side by that side's enforcement state,
and take the worst side. One refinement: a user-group match is visible only on the
consumer's host (no firewall sees the remote user), so the provider side's raw verdict is
computed without the instances matched through a user group alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bulkhead.domain.addresses import canonical_ip, parse_ip
from bulkhead.domain.model import Policy, Workload
from bulkhead.policy.resolve import Instance, ResolvedPolicy, resolve

ALLOWED = "allowed"
ACROSS = "allowed_across_boundary"
UNKNOWN = "unknown"
DECISIONS: tuple[str, ...] = (
    "allowed", "allowed_across_boundary", "blocked_by_override_deny", "blocked_by_deny",
    "blocked_no_rule", "potentially_blocked_by_override_deny", "potentially_blocked_by_deny",
    "potentially_blocked_no_rule", "unknown")
RAW_VERDICTS: tuple[str, ...] = (
    "allowed", "allowed_across_boundary", "blocked_by_override_deny", "blocked_by_deny",
    "blocked_no_rule")


@dataclass(frozen=True)
class Flow:
    src_ip: str
    dst_ip: str
    proto: int
    dst_port: int | None = None  # the ICMP type for ICMP flows
    process: str | None = None  # serving process on the destination
    unit: str | None = None  # serving systemd unit / Windows service on the destination
    user: str | None = None  # user behind the source


@dataclass(frozen=True)
class Decision:
    decision: str
    side: str  # "provider", "consumer", or "" when no side decided (unknown)
    rules: tuple[str, ...]  # ids of every matching rule instance, policy order, no repeats

    @property
    def blocked(self) -> bool:
        return self.decision.startswith("blocked")


def raw_verdict(has_override: bool, has_allow: bool, has_deny: bool) -> str:
    if has_override:
        return "blocked_by_override_deny"
    if has_allow:
        return ACROSS if has_deny else ALLOWED
    if has_deny:
        return "blocked_by_deny"
    return "blocked_no_rule"


def soften(raw: str, enforcement: str) -> str:
    """What one enforcing side makes of the raw verdict in its enforcement state."""
    if not raw.startswith("blocked"):
        return raw
    if enforcement == "full":
        return raw
    if enforcement == "selective" and raw != "blocked_no_rule":
        return raw
    return "potentially_" + raw


def severity(decision: str) -> int:
    if decision.startswith("blocked"):
        return 3
    if decision.startswith("potentially"):
        return 2
    return 1 if decision == ACROSS else 0


def combine(raw: str, provider: Workload | None, consumer: Workload | None,
            outbound: str, consumer_raw: str | None = None) -> tuple[str, str]:
    """(decision, deciding side) from the raw verdict and the two ends' workloads.
    `consumer_raw` is the consumer side's raw verdict when it differs (user-group rules)."""
    sides: list[tuple[str, str]] = []
    if provider is not None and provider.managed:
        sides.append((soften(raw, provider.enforcement), "provider"))
    if consumer is not None and consumer.managed:
        c_raw = raw if consumer_raw is None else consumer_raw
        verdict = ALLOWED if outbound == "allow" else soften(c_raw, consumer.enforcement)
        sides.append((verdict, "consumer"))
    if not sides:
        return UNKNOWN, ""
    best = sides[0]
    for s in sides[1:]:
        if severity(s[0]) > severity(best[0]):
            best = s
    return best


class Evaluator:
    def __init__(self, policy: Policy | ResolvedPolicy) -> None:
        self.resolved = policy if isinstance(policy, ResolvedPolicy) else resolve(policy)
        self.policy = self.resolved.policy
        self.by_ip: dict[str, Workload] = {ip: w for w in self.policy.workloads for ip in w.ips}
        self.instances = self.resolved.instances
        from bulkhead.policy.compile import SideIndex

        prov, cons = SideIndex(self.instances, True), SideIndex(self.instances, False)
        self.as_provider: dict[str, frozenset[int]] = {}
        self.as_consumer: dict[str, frozenset[int]] = {}
        for w in self.policy.workloads:
            self.as_provider[w.name] = frozenset(prov.term_member_of(w))
            self.as_consumer[w.name] = frozenset(cons.term_member_of(w))
        self.ip_providers = [i for i in self.instances if i.providers.addresses]
        self.ip_consumers = [i for i in self.instances if i.consumers.addresses]
        self.user_consumers = [i for i in self.instances if i.consumers.users]

    def workload_for(self, ip: str) -> Workload | None:
        w = self.by_ip.get(ip)
        if w is None:
            try:
                w = self.by_ip.get(canonical_ip(ip))
            except ValueError:
                return None
        return w

    def matching(self, flow: Flow, src: Workload | None,
                 dst: Workload | None) -> list[Instance]:
        """Every instance that matches the flow (the consumer side's view)."""
        return [i for i, _ in self.matching_sides(flow, src, dst)]

    def matching_sides(self, flow: Flow, src: Workload | None,
                       dst: Workload | None) -> list[tuple[Instance, bool]]:
        """Matching instances, each with whether the provider side can see the match: a
        match through a user group only is seen by the consumer's host alone."""
        prov: set[int] = set(self.as_provider[dst.name]) if dst is not None else set()
        cons: set[int] = set(self.as_consumer[src.name]) if src is not None else set()
        if self.ip_providers:
            d = parse_ip(flow.dst_ip)
            prov.update(i.index for i in self.ip_providers
                        if i.providers.addresses.contains_int(d.version, int(d)))
        if self.ip_consumers:
            s = parse_ip(flow.src_ip)
            cons.update(i.index for i in self.ip_consumers
                        if i.consumers.addresses.contains_int(s.version, int(s)))
        by_user: set[int] = set()
        if flow.user is not None:
            by_user = {i.index for i in self.user_consumers if flow.user in i.consumers.users}
        out = []
        for idx in sorted(prov & (cons | by_user)):
            inst = self.instances[idx]
            if inst.service_matches(flow.proto, flow.dst_port, flow.process, flow.unit):
                out.append((inst, idx in cons))
        return out

    def decide(self, flow: Flow) -> Decision:
        parse_ip(flow.src_ip)  # a malformed address is an error whatever the policy holds
        parse_ip(flow.dst_ip)
        src = self.workload_for(flow.src_ip)
        dst = self.workload_for(flow.dst_ip)
        hits = self.matching_sides(flow, src, dst)
        every = {i.action for i, _ in hits}
        seen = {i.action for i, visible in hits if visible}
        consumer_raw = raw_verdict("override_deny" in every, "allow" in every, "deny" in every)
        raw = consumer_raw if seen == every else raw_verdict(
            "override_deny" in seen, "allow" in seen, "deny" in seen)
        decision, side = combine(raw, dst, src, self.policy.settings.outbound, consumer_raw)
        return Decision(decision, side, tuple(dict.fromkeys(i.rule_id for i, _ in hits)))


def evaluate(flow: Flow, policy: Policy) -> Decision:
    """Decide one flow against a policy (builds the index each call; use Evaluator for many)."""
    return Evaluator(policy).decide(flow)


def as_fully_enforced(policy: Policy) -> Policy:
    """The policy with every workload managed and in full enforcement (for intent tests)."""
    return replace(policy, workloads=tuple(replace(w, managed=True, enforcement="full")
                                           for w in policy.workloads))
