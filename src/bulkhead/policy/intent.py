"""Running a policy file's `tests` (intent that must keep holding as the policy changes).

Each test is evaluated as if every workload were managed and in full enforcement, so a test
speaks of the policy, not of today's rollout. `blocked` means any `blocked_*` decision. An
actor endpoint expands to every workload it matches (each must satisfy the expectation); an
IP-list endpoint to the first address of each of its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bulkhead.domain.addresses import AddressSet, parse_ip
from bulkhead.domain.model import Actor, Endpoint, Policy, PolicyTest, Workload
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.evaluate import Decision, Evaluator, Flow, as_fully_enforced
from bulkhead.policy.resolve import Resolver, Term, conjoin


@dataclass(frozen=True)
class Failure:
    source: str
    target: str
    decision: Decision


@dataclass(frozen=True)
class TestOutcome:
    index: int
    test: PolicyTest
    checked: int  # flows evaluated
    failures: tuple[Failure, ...] = ()
    problem: str | None = None  # the test cannot be run as written
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures and self.problem is None


def _addresses(policy: Policy, resolver: Resolver, e: Endpoint) -> list[tuple[str, str]]:
    """(label, address) pairs an endpoint stands for."""
    if isinstance(e, str):
        w = policy.workload(e)
        if w is not None:
            return [(w.name, ip) for ip in w.ips[:1]]
        return [(e, e)]
    return _actor_addresses(policy, resolver, e)


def _actor_addresses(policy: Policy, resolver: Resolver, a: Actor) -> list[tuple[str, str]]:
    if a.kind == "ip_list":
        assert a.name is not None
        s: AddressSet = resolver.ip_lists[a.name]
        return [(f"{a.name}:{first}", first) for first in _firsts(s)]
    match = resolver.selector(a.selector) if a.kind == "labels" and a.selector else ()
    if match is None or conjoin(match, ()) is None:
        return []
    term = Term(match, a.name if a.kind == "workload" else None)
    ws: list[Workload] = [w for w in policy.workloads if term.matches(w)]
    return [(w.name, w.ips[0]) for w in ws if w.ips]


def _firsts(s: AddressSet) -> list[str]:
    return [first for first, _ in s.describe_intervals()]


def run_tests(policy: Policy) -> list[TestOutcome]:
    full = as_fully_enforced(policy)
    ev = Evaluator(full)
    resolver = Resolver(policy)
    outcomes = []
    for i, t in enumerate(policy.tests):
        spec = PortSpec.parse(t.port)
        assert spec.proto is not None
        port = spec.lo
        srcs = _addresses(policy, resolver, t.source)
        dsts = _addresses(policy, resolver, t.target)
        if not srcs or not dsts:
            side = "from" if not srcs else "to"
            outcomes.append(TestOutcome(i, t, 0, problem=f"'{side}' matches no workload with "
                                        "an address"))
            continue
        failures = []
        checked = 0
        for s_name, s_ip in srcs:
            for d_name, d_ip in dsts:
                if s_ip == d_ip or parse_ip(s_ip).version != parse_ip(d_ip).version:
                    continue
                checked += 1
                d = ev.decide(Flow(s_ip, d_ip, spec.proto, port, process=t.process,
                                   user=t.user))
                ok = d.blocked if t.expect == "blocked" else not d.blocked
                if not ok:
                    failures.append(Failure(s_name, d_name, d))
        if checked == 0:
            outcomes.append(TestOutcome(i, t, 0, problem="no pair of addresses of the same IP "
                                        "version to test"))
            continue
        outcomes.append(TestOutcome(i, t, checked, tuple(failures)))
    return outcomes
