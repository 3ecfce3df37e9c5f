"""Resolving a policy: label groups expanded, each rule instantiated once per scope, actors
turned into matchers, services into port specs.

Theory of operation: a *match* is a conjunction of (label key, allowed values). A labels actor
AND its ruleset scope is one match; `all_workloads` in scope is the scope's match; a workload
actor is a match plus a name. IP-list actors resolve to one `AddressSet` per side and user
groups to a set of user names; neither is restricted by scope. Everything downstream (the
evaluators, the compilers, lint, diff) works on `Instance`s, so the scope rules of
docs/policy-semantics.md live only here.
"""

from __future__ import annotations

import ntpath
from collections.abc import Iterable
from dataclasses import dataclass

from bulkhead.domain.addresses import EMPTY, AddressSet
from bulkhead.domain.model import (
    Actor,
    GroupRef,
    Policy,
    Rule,
    Ruleset,
    Selector,
    Workload,
    effective_rule_id,
)
from bulkhead.domain.ports import PortSpec

# key -> allowed values; every key must be satisfied. () matches every workload.
Match = tuple[tuple[str, frozenset[str]], ...]
EVERYTHING: Match = ()


def match_labels(match: Match, labels: dict[str, str]) -> bool:
    for key, values in match:
        v = labels.get(key)
        if v is None or v not in values:
            return False
    return True


def conjoin(a: Match, b: Match) -> Match | None:
    """a AND b, or None when no label set can satisfy both."""
    merged: dict[str, frozenset[str]] = dict(a)
    for key, values in b:
        merged[key] = merged[key] & values if key in merged else values
        if not merged[key]:
            return None
    return tuple(sorted(merged.items()))


@dataclass(frozen=True)
class Term:
    """One workload-matching actor after scoping: labels match plus optional workload name."""

    match: Match
    name: str | None = None

    def matches(self, w: Workload, labels: dict[str, str] | None = None) -> bool:
        if self.name is not None and w.name != self.name:
            return False
        return match_labels(self.match, labels if labels is not None else w.label_dict)


@dataclass(frozen=True)
class Side:
    """Who a rule instance admits on one side."""

    terms: tuple[Term, ...] = ()
    addresses: AddressSet = EMPTY  # from ip_list actors, by address
    users: frozenset[str] = frozenset()  # from user_group actors (consumers only)
    user_groups: tuple[str, ...] = ()

    def matches_workload(self, w: Workload, labels: dict[str, str] | None = None) -> bool:
        lab = labels if labels is not None else w.label_dict
        return any(t.matches(w, lab) for t in self.terms)


@dataclass(frozen=True)
class ResolvedService:
    spec: PortSpec
    process: str | None = None
    unit: str | None = None

    def matches(self, proto: int, port: int | None, process: str | None,
                unit: str | None) -> bool:
        if not self.spec.matches(proto, port):
            return False
        if self.process is not None and (process is None or exe_name(process) != self.process):
            return False
        return self.unit is None or unit == self.unit


def exe_name(process: str) -> str:
    """`/usr/sbin/mysqld` and `C:\\x\\sqlservr.exe` → their last component."""
    return ntpath.basename(process.replace("\\", "/").rsplit("/", 1)[-1])


@dataclass(frozen=True)
class Instance:
    index: int
    rule_id: str
    action: str
    ruleset: str
    rule_path: str  # rulesets[i].rules[j]
    scope_index: int | None
    consumers: Side
    providers: Side
    services: tuple[ResolvedService, ...]
    contradicted_actor: bool = False  # some workload actor was contradicted by the scope

    def service_matches(self, proto: int, port: int | None, process: str | None = None,
                        unit: str | None = None) -> bool:
        return any(s.matches(proto, port, process, unit) for s in self.services)


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: Policy
    instances: tuple[Instance, ...]
    group_values: dict[str, frozenset[str]]
    rule_ids: tuple[str, ...]  # every rule id, in file order


class Resolver:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.group_values = expand_groups(policy)
        self.ip_lists = {x.name: AddressSet.from_blocks(x.cidrs, x.exclude)
                         for x in policy.ip_lists}
        self.services = {s.name: s for s in policy.services}
        self.users = {u.name: frozenset(u.members) for u in policy.user_groups}

    def selector(self, sel: Selector) -> Match | None:
        out: dict[str, frozenset[str]] = {}
        for key, value in sel.terms:
            if isinstance(value, GroupRef):
                vals = self.group_values.get(value.name, frozenset())
            elif isinstance(value, (tuple, list)):
                vals = frozenset(value)
            else:
                vals = frozenset((value,))
            if not vals:
                return None
            out[key] = vals
        return tuple(sorted(out.items()))

    def side(self, actors: Iterable[Actor], scope: Match | None,
             scoped: bool) -> tuple[Side, bool]:
        """Returns the side and whether some workload actor can never match in scope."""
        terms: list[Term] = []
        addrs = EMPTY
        users: set[str] = set()
        groups: list[str] = []
        contradicted = False
        restrict: Match | None = scope if scoped else EVERYTHING
        for a in actors:
            if a.kind == "ip_list":
                assert a.name is not None
                addrs = addrs | self.ip_lists[a.name]
                continue
            if a.kind == "user_group":
                assert a.name is not None
                users |= self.users[a.name]
                groups.append(a.name)
                continue
            if a.kind == "labels":
                assert a.selector is not None
                base = self.selector(a.selector)
            else:
                base = EVERYTHING
            m = conjoin(base, restrict) if base is not None and restrict is not None else None
            if m is None:
                contradicted = True
                continue
            terms.append(Term(m, a.name if a.kind == "workload" else None))
        side = Side(tuple(dict.fromkeys(terms)), addrs, frozenset(users), tuple(groups))
        return side, contradicted

    def rule_services(self, rule: Rule) -> tuple[ResolvedService, ...]:
        out: list[ResolvedService] = []
        for s in rule.services:
            svc = self.services.get(s)
            if svc is None:
                out.append(ResolvedService(PortSpec.parse(s)))
            else:
                proc = exe_name(svc.process) if svc.process else None
                out.extend(ResolvedService(PortSpec.parse(p), proc, svc.unit)
                           for p in svc.ports)
        return tuple(dict.fromkeys(out))

    def resolve(self) -> ResolvedPolicy:
        instances: list[Instance] = []
        rule_ids: list[str] = []
        for ri, rs in enumerate(self.policy.rulesets):
            scopes = self._scopes(rs)
            for j, rule in enumerate(rs.rules):
                rid = effective_rule_id(rs, j, rule)
                rule_ids.append(rid)
                if not rs.enabled:
                    continue
                services = self.rule_services(rule)
                for si, scope in scopes:
                    cons, c_bad = self.side(rule.consumers, scope, not rule.extra_scope)
                    prov, p_bad = self.side(rule.providers, scope, True)
                    instances.append(Instance(
                        len(instances), rid, rule.action, rs.name, f"rulesets[{ri}].rules[{j}]",
                        si, cons, prov, services, contradicted_actor=c_bad or p_bad))
        return ResolvedPolicy(self.policy, tuple(instances), self.group_values, tuple(rule_ids))

    def _scopes(self, rs: Ruleset) -> list[tuple[int | None, Match | None]]:
        if not rs.scopes:
            return [(None, EVERYTHING)]
        return [(i, self.selector(s)) for i, s in enumerate(rs.scopes)]


def expand_groups(policy: Policy) -> dict[str, frozenset[str]]:
    by_name = {g.name: g for g in policy.label_groups}
    memo: dict[str, frozenset[str]] = {}

    def values(name: str, seen: frozenset[str]) -> frozenset[str]:
        if name in memo:
            return memo[name]
        g = by_name.get(name)
        if g is None or name in seen:
            return frozenset()
        out = set(g.values)
        for sub in g.groups:
            out |= values(sub, seen | {name})
        memo[name] = frozenset(out)
        return memo[name]

    return {name: values(name, frozenset()) for name in by_name}


def resolve(policy: Policy) -> ResolvedPolicy:
    return Resolver(policy).resolve()
