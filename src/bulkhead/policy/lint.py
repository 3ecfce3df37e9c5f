"""Lint: semantic checks on a policy, each finding with a stable code and the path of the
offending object (docs/design/lint-and-diff.md lists every code with an example).

Theory of operation, in three passes:

1. **References.** The policy is checked for dangling references and malformed values that the
   loader would have rejected (so lint also runs on policies built in Python), and a sanitised
   copy is made that the resolver can always digest: unknown IP lists, user groups and services
   become empty placeholders, malformed actors become unmatchable, bad CIDRs, ports and
   addresses are dropped. Rules touched by such an error are not checked further.
2. **Structure.** For every rule, scope and actor, whether the actor can match inside the scope
   (`Resolver.selector` + `conjoin`, the same label algebra the resolver uses): a rule dead in
   every scope is an error, dead in some scopes a warning per scope, a dead actor beside live
   ones a warning on the actor.
3. **Concrete sets.** The sanitised policy is resolved into instances; each side becomes a bit
   set of workloads (label posting lists: OR over a key's values, AND over keys) plus its
   IP-list `AddressSet` and user set. Shadowing is containment of these sets (workload bits,
   addresses, users, and `PortSpec` coverage of services), searched only among instances whose
   provider bit set is a superset, so the cost is O(instances x provider buckets).

`lint` is pure: no I/O, the `Document` only supplies lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from bulkhead.domain.addresses import V4_MAX, V6_MAX, AddressSet, parse_block, parse_ip
from bulkhead.domain.errors import Issue
from bulkhead.domain.model import (
    ACTIONS,
    Actor,
    GroupRef,
    IPList,
    Policy,
    PolicyTest,
    Rule,
    Ruleset,
    Selector,
    SelectorValue,
    Service,
    UserGroup,
    Workload,
    effective_rule_id,
)
from bulkhead.policy.fileformat import is_port_spec
from bulkhead.policy.resolve import (
    EVERYTHING,
    Instance,
    Match,
    ResolvedService,
    Resolver,
    Term,
    conjoin,
    match_labels,
)
from bulkhead.policy.source import Document

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}

# Every code lint can emit, with its severity (over-broad is info for deny rules).
CODES: dict[str, str] = {
    "dangling-reference": "error",
    "invalid": "error",
    "never-matches": "error",
    "never-matches-in-scope": "warning",
    "unmatchable-actor": "warning",
    "shadowed": "warning",
    "over-broad": "warning",
    "no-workloads": "warning",
    "empty-label-group": "warning",
    "empty-ip-list": "warning",
    "user-group-provider-side": "warning",
    "unused": "info",
}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str
    path: str
    message: str
    line: int | None = None
    source: str | None = None  # the file, when lint was given a Document read from one

    def issue(self) -> Issue:
        return Issue(self.path, self.message, self.line, self.source)

    def __str__(self) -> str:
        return str(self.issue())


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def lint(policy: Policy, doc: Document | None = None) -> list[Finding]:
    """Every finding about `policy`, sorted by (severity, path); lines from `doc` if given."""
    findings = _Linter(policy).run()
    if doc is not None:
        findings = [replace(f, line=doc.line(f.path), source=doc.source) for f in findings]
    return sorted(set(findings), key=_sort_key)


def _sort_key(f: Finding) -> tuple[int, tuple[str | int, ...], str, str]:
    return SEVERITY_ORDER[f.severity], _path_key(f.path), f.code, f.message


def _path_key(path: str) -> tuple[str | int, ...]:
    parts = re.split(r"\[(\d+)\]", path)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# -- rendering ---------------------------------------------------------------------------------

def render_selector(sel: Selector) -> str:
    parts = []
    for k, v in sel.terms:
        if isinstance(v, GroupRef):
            parts.append(f"{k}: {{group: {v.name}}}")
        elif isinstance(v, tuple):
            parts.append(f"{k}: [{', '.join(v)}]")
        else:
            parts.append(f"{k}: {v}")
    return "{" + ", ".join(parts) + "}"


def render_actor(a: Actor) -> str:
    if a.kind == "labels":
        return render_selector(a.selector) if a.selector is not None else "labels"
    if a.kind == "all_workloads":
        return "all workloads"
    return f"{a.kind.replace('_', ' ')} {a.name!r}"


def _render_match(m: Match) -> str:
    parts = []
    for k, vals in m:
        vs = sorted(vals)
        parts.append(f"{k}: {vs[0]}" if len(vs) == 1 else f"{k}: [{', '.join(vs)}]")
    return "{" + ", ".join(parts) + "}"


# -- pass 1: references ------------------------------------------------------------------------

_DEAD_SELECTOR = Selector((("", ()),))  # resolves to no match: an unmatchable actor
_DEAD_ACTOR = Actor("labels", selector=_DEAD_SELECTOR)
_NAMED_KINDS = ("workload", "ip_list", "user_group")


class _Sanitiser:
    """Reports references and values the loader would reject; builds a resolvable copy."""

    def __init__(self, p: Policy) -> None:
        self.p = p
        self.findings: list[Finding] = []
        self.tainted: set[str] = set()  # rule / scope paths with an error inside
        self.group_key: dict[str, str] = {}
        for g in p.label_groups:
            self.group_key.setdefault(g.name, g.key)
        self.ip_lists = {x.name for x in p.ip_lists}
        self.services = {s.name for s in p.services}
        self.user_groups = {u.name for u in p.user_groups}
        self.workloads = {w.name for w in p.workloads}
        self.missing_ip_lists: set[str] = set()
        self.missing_user_groups: set[str] = set()
        self.missing_services: set[str] = set()

    def err(self, code: str, path: str, message: str, taint: str | None = None) -> None:
        self.findings.append(Finding("error", code, path, message))
        if taint is not None:
            self.tainted.add(taint)

    def run(self) -> Policy:
        p = self.p
        self._duplicates("label_groups", [g.name for g in p.label_groups], "label group")
        self._duplicates("ip_lists", [x.name for x in p.ip_lists], "IP list")
        self._duplicates("services", [s.name for s in p.services], "service")
        self._duplicates("user_groups", [u.name for u in p.user_groups], "user group")
        self._duplicates("workloads", [w.name for w in p.workloads], "workload")
        self._duplicates("rulesets", [rs.name for rs in p.rulesets], "ruleset")
        groups = []
        for i, g in enumerate(p.label_groups):
            keep = []
            for j, sub in enumerate(g.groups):
                path = f"label_groups[{i}].groups[{j}]"
                if sub not in self.group_key:
                    self.err("dangling-reference", path, f"unknown label group {sub!r}")
                elif self.group_key[sub] != g.key:
                    self.err("invalid", path, f"group {sub!r} is of key "
                             f"{self.group_key[sub]!r}, not {g.key!r}")
                else:
                    keep.append(sub)
            groups.append(replace(g, groups=tuple(keep)))
        ip_lists = [replace(x, cidrs=self._blocks(x.cidrs, f"ip_lists[{i}].cidrs"),
                            exclude=self._blocks(x.exclude, f"ip_lists[{i}].exclude"))
                    for i, x in enumerate(p.ip_lists)]
        services = [replace(s, ports=self._ports(s.ports, f"services[{i}].ports"))
                    for i, s in enumerate(p.services)]
        for i, s in enumerate(p.services):
            if not s.ports:
                self.err("invalid", f"services[{i}].ports", "a service needs at least one port "
                         "spec")
        workloads = self._workloads(p.workloads)
        rulesets = [self._ruleset(rs, f"rulesets[{i}]") for i, rs in enumerate(p.rulesets)]
        for i, t in enumerate(p.tests):
            self._test(t, f"tests[{i}]")
        ip_lists += [IPList(n) for n in sorted(self.missing_ip_lists)]
        services += [Service(n) for n in sorted(self.missing_services)]
        user_groups = list(p.user_groups) + [UserGroup(n)
                                             for n in sorted(self.missing_user_groups)]
        return replace(p, label_groups=tuple(groups), ip_lists=tuple(ip_lists),
                       services=tuple(services), user_groups=tuple(user_groups),
                       workloads=tuple(workloads), rulesets=tuple(rulesets))

    def _duplicates(self, section: str, names: list[str], what: str) -> None:
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in seen:
                self.err("invalid", f"{section}[{i}].name",
                         f"duplicate {what} name {n!r} (first at {section}[{seen[n]}])")
            else:
                seen[n] = i

    def _blocks(self, blocks: tuple[str, ...], path: str) -> tuple[str, ...]:
        out = []
        for j, b in enumerate(blocks):
            try:
                parse_block(b)
            except (ValueError, AttributeError, TypeError):
                self.err("invalid", f"{path}[{j}]", f"not an address, CIDR or range: {b!r}")
                continue
            out.append(b)
        return tuple(out)

    def _ports(self, ports: tuple[str, ...], path: str) -> tuple[str, ...]:
        out = []
        for j, spec in enumerate(ports):
            if is_port_spec(spec):
                out.append(spec)
            else:
                self.err("invalid", f"{path}[{j}]", f"not a port spec: {spec!r}")
        return tuple(out)

    def _workloads(self, workloads: tuple[Workload, ...]) -> list[Workload]:
        owner: dict[str, str] = {}
        out = []
        for i, w in enumerate(workloads):
            ips = []
            for j, ip in enumerate(w.ips):
                path = f"workloads[{i}].ips[{j}]"
                try:
                    c = str(parse_ip(ip))
                except ValueError:
                    self.err("invalid", path, f"not an IP address: {ip!r}")
                    continue
                if c in owner:
                    self.err("invalid", path, f"address {c} already belongs to {owner[c]!r}")
                    continue
                owner[c] = w.name
                ips.append(c)
            out.append(replace(w, ips=tuple(ips)))
        return out

    def _selector(self, sel: Selector, path: str, taint: str) -> Selector:
        """Checks group references and value types; returns a selector the resolver can use
        (a malformed value becomes one that allows nothing)."""
        terms: list[tuple[str, SelectorValue]] = []
        for key, value in sel.terms:
            kp = f"{path}.{key}"
            if isinstance(value, GroupRef):
                if value.name not in self.group_key:
                    self.err("dangling-reference", kp, f"unknown label group {value.name!r}",
                             taint)
                elif self.group_key[value.name] != key:
                    self.err("invalid", kp, f"group {value.name!r} is of key "
                             f"{self.group_key[value.name]!r}, not {key!r}", taint)
                terms.append((key, value))
            elif isinstance(value, str):
                terms.append((key, value))
            elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
                terms.append((key, tuple(value)))
            else:
                self.err("invalid", kp, f"a selector value is a string, a list of strings or "
                         f"a group reference, got {value!r}", taint)
                terms.append((key, ()))
        return Selector(tuple(terms))

    def _actor(self, a: Actor, path: str, taint: str, *, consumer: bool) -> Actor:
        if a.kind == "labels":
            if a.selector is None:
                self.err("invalid", path, "a labels actor needs a selector", taint)
                return _DEAD_ACTOR
            return replace(a, selector=self._selector(a.selector, f"{path}.labels", taint))
        if a.kind == "all_workloads":
            return a
        if a.kind not in _NAMED_KINDS:
            self.err("invalid", path, f"unknown actor kind {a.kind!r}", taint)
            return _DEAD_ACTOR
        if not a.name:
            self.err("invalid", path, f"a {a.kind} actor needs a name", taint)
            return _DEAD_ACTOR
        known, missing = {
            "workload": (self.workloads, None),
            "ip_list": (self.ip_lists, self.missing_ip_lists),
            "user_group": (self.user_groups, self.missing_user_groups)}[a.kind]
        if a.name not in known:
            self.err("dangling-reference", path, f"unknown {a.kind} {a.name!r}", taint)
            if missing is not None:
                missing.add(a.name)
        if a.kind == "user_group" and not consumer:
            self.err("invalid", path, "user_group actors are consumers only", taint)
            return _DEAD_ACTOR
        return a

    def _ruleset(self, rs: Ruleset, path: str) -> Ruleset:
        scopes = tuple(self._selector(sel, f"{path}.scopes[{k}]", f"{path}.scopes[{k}]")
                       for k, sel in enumerate(rs.scopes))
        broken_scope = any(f"{path}.scopes[{k}]" in self.tainted for k in range(len(scopes)))
        rules = []
        for j, rule in enumerate(rs.rules):
            rp = f"{path}.rules[{j}]"
            if broken_scope:
                self.tainted.add(rp)
            cons = tuple(self._actor(a, f"{rp}.consumers[{k}]", rp, consumer=True)
                         for k, a in enumerate(rule.consumers))
            prov = tuple(self._actor(a, f"{rp}.providers[{k}]", rp, consumer=False)
                         for k, a in enumerate(rule.providers))
            for k, s in enumerate(rule.services):
                if s in self.services or is_port_spec(s):
                    continue
                self.err("dangling-reference", f"{rp}.services[{k}]",
                         f"unknown service {s!r} (not a name in services nor a port spec "
                         "like tcp/443)", rp)
                self.missing_services.add(s)
            if rule.action not in ACTIONS:
                self.err("invalid", f"{rp}.action", f"unknown action {rule.action!r} "
                         f"(expected one of: {', '.join(ACTIONS)})", rp)
            rules.append(replace(rule, consumers=cons, providers=prov))
        return replace(rs, rules=tuple(rules), scopes=scopes)

    def _test(self, t: PolicyTest, path: str) -> None:
        for end, attr in ((t.source, "from"), (t.target, "to")):
            ep = f"{path}.{attr}"
            if isinstance(end, Actor):
                self._actor(end, ep, path, consumer=True)
            elif end not in self.workloads:
                try:
                    parse_ip(end)
                except ValueError:
                    self.err("dangling-reference", ep,
                             f"{end!r} is neither a workload nor an address", path)
        if not is_port_spec(t.port):
            self.err("invalid", f"{path}.port", f"not a port spec: {t.port!r}", path)


# -- pass 3 helpers: concrete sets -------------------------------------------------------------

def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Universe:
    """The workloads as bit positions, with label posting lists and address owners."""

    def __init__(self, workloads: tuple[Workload, ...]) -> None:
        self.ws = workloads
        self.all = (1 << len(workloads)) - 1
        self.post: dict[str, dict[str, int]] = {}
        self.by_name: dict[str, int] = {}
        self.owner: dict[tuple[int, int], int] = {}
        self.ips: list[list[tuple[int, int]]] = []
        self.with_ip = 0
        self.managed = 0
        for idx, w in enumerate(workloads):
            bit = 1 << idx
            self.by_name.setdefault(w.name, idx)
            for k, v in w.labels:
                d = self.post.setdefault(k, {})
                d[v] = d.get(v, 0) | bit
            addrs: list[tuple[int, int]] = []
            for ip in w.ips:
                a = parse_ip(ip)
                addrs.append((a.version, int(a)))
                self.owner.setdefault((a.version, int(a)), idx)
            self.ips.append(addrs)
            if addrs:
                self.with_ip |= bit
            if w.managed:
                self.managed |= bit
        self.n_addresses = len(self.owner)
        self._cache: dict[Term, int] = {}

    def term(self, t: Term) -> int:
        got = self._cache.get(t)
        if got is not None:
            return got
        if t.name is not None:
            idx = self.by_name.get(t.name)
            bits = 0
            if idx is not None and match_labels(t.match, self.ws[idx].label_dict):
                bits = 1 << idx
        else:
            bits = self.all
            for key, values in t.match:
                d = self.post.get(key, {})
                vb = 0
                for v in values:
                    vb |= d.get(v, 0)
                bits &= vb
                if not bits:
                    break
        self._cache[t] = bits
        return bits

    def names(self, mask: int, limit: int = 3) -> str:
        names = [self.ws[i].name for i in _bits(mask)]
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(repr(n) for n in names[:limit]) + more

    def ips_in(self, mask: int, addrs: AddressSet) -> bool:
        """Every address of every workload in `mask` lies in `addrs`."""
        if not addrs:
            return mask == 0
        return all(addrs.contains_int(v, n) for i in _bits(mask) for v, n in self.ips[i])

    def addresses_in(self, a: AddressSet, b: AddressSet, wmask: int) -> bool:
        """Whether a is inside b plus the addresses of the workloads in `wmask`."""
        rem = a - b
        if not rem:
            return True
        if rem.size() > self.n_addresses:
            return False
        for version, intervals in ((4, rem.v4), (6, rem.v6)):
            for lo, hi in intervals:
                for n in range(lo, hi + 1):
                    o = self.owner.get((version, n))
                    if o is None or not (wmask >> o) & 1:
                        return False
        return True


_FULL_V4 = ((0, V4_MAX),)
_FULL_V6 = ((0, V6_MAX),)


@dataclass
class _Inst:
    inst: Instance
    wc: int  # consumer workloads (bits), by label/name term
    wp: int  # provider workloads
    wc_ip: int  # ... restricted to workloads that have an address (can appear in a flow)
    wp_ip: int
    empty: bool  # admits no flow at all
    universal_consumers: bool  # the consumer addresses are every v4 and v6 address

    @property
    def ac(self) -> AddressSet:
        return self.inst.consumers.addresses

    @property
    def ap(self) -> AddressSet:
        return self.inst.providers.addresses


def _service_covered(s: ResolvedService, others: tuple[ResolvedService, ...]) -> bool:
    """Every flow `s` matches is matched by some service of `others`."""
    cands = [t.spec for t in others
             if (t.process is None or t.process == s.process)
             and (t.unit is None or t.unit == s.unit)]
    if any(c.contains(s.spec) for c in cands):
        return True
    sp = s.spec
    if sp.proto is None or sp.lo is None or sp.hi is None:
        return False
    cur = sp.lo
    for lo, hi in sorted((c.lo, c.hi) for c in cands
                         if c.proto == sp.proto and c.lo is not None and c.hi is not None):
        if lo > cur:
            return False
        cur = max(cur, hi + 1)
        if cur > sp.hi:
            return True
    return False


# -- the linter --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Scope:
    index: int | None
    path: str  # "" for a ruleset without scopes
    match: Match | None  # None: the scope itself can match no workload
    text: str
    why_empty: str = ""


class _Linter:
    def __init__(self, policy: Policy) -> None:
        self.original = policy
        san = _Sanitiser(policy)
        self.p = san.run()
        self.findings = san.findings
        self.tainted = san.tainted
        self.resolver = Resolver(self.p)
        self.ip_sets = self.resolver.ip_lists
        self.users = self.resolver.users
        self.group_values = self.resolver.group_values
        self.never: set[str] = set()  # rule paths with a never-matches error

    def add(self, severity: Severity, code: str, path: str, message: str) -> None:
        self.findings.append(Finding(severity, code, path, message))

    def run(self) -> list[Finding]:
        self._groups_and_lists()
        self._unused()
        self._structure()
        self._concrete()
        return self.findings

    # -- objects ----------------------------------------------------------------------------
    def _groups_and_lists(self) -> None:
        for i, g in enumerate(self.original.label_groups):
            if not self.group_values.get(g.name):
                self.add("warning", "empty-label-group", f"label_groups[{i}]",
                         f"label group {g.name!r} has no values (after expanding its groups): "
                         "every selector that uses it matches nothing")
        for i, x in enumerate(self.original.ip_lists):
            if not self.ip_sets.get(x.name):
                what = "its exclusions remove every address" if x.cidrs else "it has no CIDRs"
                self.add("warning", "empty-ip-list", f"ip_lists[{i}]",
                         f"IP list {x.name!r} is empty ({what}): actors using it match nothing")

    def _unused(self) -> None:
        p = self.original
        groups: set[str] = set()
        ip_lists: set[str] = set()
        services: set[str] = set()
        user_groups: set[str] = set()

        def selector(sel: Selector | None) -> None:
            if sel is not None:
                groups.update(v.name for _, v in sel.terms if isinstance(v, GroupRef))

        def actor(a: Actor) -> None:
            selector(a.selector)
            if a.kind == "ip_list" and a.name:
                ip_lists.add(a.name)
            elif a.kind == "user_group" and a.name:
                user_groups.add(a.name)

        for rs in p.rulesets:
            for sel in rs.scopes:
                selector(sel)
            for rule in rs.rules:
                for a in (*rule.consumers, *rule.providers):
                    actor(a)
                services.update(rule.services)
        for t in p.tests:
            for e in (t.source, t.target):
                if isinstance(e, Actor):
                    actor(e)
        by_name = {g.name: g for g in p.label_groups}
        todo = list(groups)
        while todo:
            g = by_name.get(todo.pop())
            for sub in g.groups if g is not None else ():
                if sub not in groups:
                    groups.add(sub)
                    todo.append(sub)
        sections: list[tuple[str, list[str], set[str], str]] = [
            ("label_groups", [g.name for g in p.label_groups], groups, "label group"),
            ("ip_lists", [x.name for x in p.ip_lists], ip_lists, "IP list"),
            ("services", [s.name for s in p.services], services, "service"),
            ("user_groups", [u.name for u in p.user_groups], user_groups, "user group")]
        for section, names, used, what in sections:
            for i, n in enumerate(names):
                if n not in used:
                    self.add("info", "unused", f"{section}[{i}]",
                             f"{what} {n!r} is not used by any rule, scope or test")

    # -- pass 2: structure ------------------------------------------------------------------
    def _scopes(self, ri: int, rs: Ruleset) -> list[_Scope]:
        if not rs.scopes:
            return [_Scope(None, "", EVERYTHING, "(global)")]
        out = []
        for k, sel in enumerate(rs.scopes):
            m = self.resolver.selector(sel)
            why = self._empty_selector(sel) if m is None else ""
            out.append(_Scope(k, f"rulesets[{ri}].scopes[{k}]", m, render_selector(sel), why))
        return out

    def _empty_selector(self, sel: Selector) -> str:
        for key, value in sel.terms:
            if isinstance(value, GroupRef) and not self.group_values.get(value.name):
                return f"label group {value.name!r} has no values"
            if isinstance(value, tuple) and not value:
                return f"key {key!r} allows no value"
        return "it allows no value"

    def _actor_reason(self, a: Actor, scope: _Scope, scoped: bool) -> str | None:
        """Why actor `a` can never match in `scope` (None when it can)."""
        if a.kind == "ip_list":
            assert a.name is not None
            return None if self.ip_sets.get(a.name) else f"IP list {a.name!r} is empty"
        if a.kind == "user_group":
            assert a.name is not None
            return None if self.users.get(a.name) else f"user group {a.name!r} has no members"
        base: Match | None = EVERYTHING
        if a.kind == "labels":
            assert a.selector is not None
            base = self.resolver.selector(a.selector)
            if base is None:
                return f"{render_actor(a)} matches nothing: {self._empty_selector(a.selector)}"
        if not scoped:
            restrict: Match = EVERYTHING
        elif scope.match is None:
            return f"scope {scope.text} matches nothing: {scope.why_empty}"
        else:
            restrict = scope.match
        assert base is not None
        m = conjoin(base, restrict)
        if m is None:
            scope_values = dict(restrict)
            keys = [k for k, v in base if k in scope_values and not (v & scope_values[k])]
            on = ", ".join(repr(k) for k in keys)
            return f"{render_actor(a)} contradicts scope {scope.text} on {on}"
        if a.kind == "workload" and scoped:
            w = self.p.workload(a.name or "")
            if w is not None and not match_labels(restrict, w.label_dict):
                return f"workload {a.name!r} is not in scope {scope.text}"
        return None

    def _structure(self) -> None:
        for ri, rs in enumerate(self.p.rulesets):
            if not rs.enabled:
                continue
            scopes = self._scopes(ri, rs)
            if any(s.path in self.tainted for s in scopes):
                continue
            for j, rule in enumerate(rs.rules):
                rp = f"rulesets[{ri}].rules[{j}]"
                if rp not in self.tainted:
                    self._rule_structure(rp, effective_rule_id(rs, j, rule), rule, scopes)

    def _rule_structure(self, rp: str, name: str, rule: Rule, scopes: list[_Scope]) -> None:
        services = self.resolver.rule_services(rule)
        # reasons[side][actor index][scope position]
        reasons: dict[str, list[list[str | None]]] = {}
        dead: list[str | None] = []  # per scope: why the rule is dead there
        for side, actors, scoped in (("consumers", rule.consumers, not rule.extra_scope),
                                     ("providers", rule.providers, True)):
            reasons[side] = [[self._actor_reason(a, s, scoped) for s in scopes] for a in actors]
        for si, _ in enumerate(scopes):
            why: str | None = None
            for side in ("consumers", "providers"):
                rs_side = reasons[side]
                if not rs_side:
                    why = f"it has no {side}"
                elif all(r[si] is not None for r in rs_side):
                    why = "; ".join(f"{side}[{k}]: {r[si]}" for k, r in enumerate(rs_side))
                if why:
                    break
            if why is None and not services:
                why = "its services name no port spec"
            dead.append(why)
        if all(d is not None for d in dead):
            self.never.add(rp)
            if len(scopes) == 1:
                msg = f"rule {name!r} can never match: {dead[0]}"
            elif len(set(dead)) == 1:
                msg = f"rule {name!r} can never match, in any of its scopes: {dead[0]}"
            else:
                msg = f"rule {name!r} can never match in any of its scopes: " + " | ".join(
                    f"{s.path}: {d}" for s, d in zip(scopes, dead, strict=True))
            self.add("error", "never-matches", rp, msg)
            return
        for s, d in zip(scopes, dead, strict=True):
            if d is not None:
                self.add("warning", "never-matches-in-scope", rp,
                         f"rule {name!r} never matches in scope {s.path} {s.text}: {d}")
        live = [si for si, d in enumerate(dead) if d is None]
        for side in ("consumers", "providers"):
            for k, per_scope in enumerate(reasons[side]):
                bad = [si for si in live if per_scope[si] is not None]
                if not bad:
                    continue
                first = per_scope[bad[0]]
                if len(bad) == len(live):
                    where = "" if len(scopes) == 1 else " in any scope where the rule applies"
                else:
                    where = " in " + ", ".join(scopes[si].path for si in bad)
                self.add("warning", "unmatchable-actor", f"{rp}.{side}[{k}]",
                         f"{side[:-1]} of rule {name!r} can never match{where}: {first} "
                         "(the rule still matches through its other "
                         f"{side})")

    # -- pass 3: concrete sets --------------------------------------------------------------
    def _concrete(self) -> None:
        resolved = self.resolver.resolve()
        u = _Universe(self.p.workloads)
        insts: list[_Inst] = []
        for inst in resolved.instances:
            wc = 0
            for t in inst.consumers.terms:
                wc |= u.term(t)
            wp = 0
            for t in inst.providers.terms:
                wp |= u.term(t)
            wc_ip, wp_ip = wc & u.with_ip, wp & u.with_ip
            ac, ap = inst.consumers.addresses, inst.providers.addresses
            empty = (not inst.services or (not wc_ip and not ac and not inst.consumers.users)
                     or (not wp_ip and not ap))
            insts.append(_Inst(inst, wc, wp, wc_ip, wp_ip, empty,
                               ac.v4 == _FULL_V4 and ac.v6 == _FULL_V6))
        by_rule: dict[str, list[_Inst]] = {}
        for x in insts:
            by_rule.setdefault(x.inst.rule_path, []).append(x)
        rules = {f"rulesets[{ri}].rules[{j}]": (rs, rule)
                 for ri, rs in enumerate(self.p.rulesets) for j, rule in enumerate(rs.rules)}
        subjects = {rp: xs for rp, xs in by_rule.items()
                    if rp not in self.tainted and rp not in self.never}
        for rp, xs in subjects.items():
            rule = rules[rp][1]
            self._no_workloads(rp, xs)
            self._over_broad(rp, rule, xs)
            self._user_groups(rp, rule, xs, u)
        self._shadowed(subjects, insts, u)

    def _no_workloads(self, rp: str, xs: list[_Inst]) -> None:
        rid = xs[0].inst.rule_id
        if not any(x.wp or x.ap for x in xs):
            self.add("warning", "no-workloads", rp,
                     f"the providers of rule {rid!r} match no workload and no address "
                     "(it admits nothing until such workloads exist)")
        elif not any(x.wc or x.ac or x.inst.consumers.users for x in xs):
            self.add("warning", "no-workloads", rp,
                     f"the consumers of rule {rid!r} match no workload, address or user "
                     "(it admits nothing until such workloads exist)")

    def _over_broad(self, rp: str, rule: Rule, xs: list[_Inst]) -> None:
        def everyone(terms: tuple[Term, ...]) -> bool:
            return any(t.match == EVERYTHING and t.name is None for t in terms)

        for x in xs:
            c, p = x.inst.consumers, x.inst.providers
            cons_all = everyone(c.terms) or x.ac.v4 == _FULL_V4 or x.ac.v6 == _FULL_V6
            svc_any = any(s.spec.proto is None and s.process is None and s.unit is None
                          for s in x.inst.services)
            if cons_all and everyone(p.terms) and svc_any:
                sev: Severity = "warning" if rule.action == "allow" else "info"
                who = "every workload" if everyone(c.terms) else "every address"
                self.add(sev, "over-broad", rp,
                         f"rule {x.inst.rule_id!r} ({rule.action}) admits {who} to every "
                         "workload on any service; narrow its consumers, providers or services")
                return

    def _user_groups(self, rp: str, rule: Rule, xs: list[_Inst], u: _Universe) -> None:
        managed = 0
        for x in xs:
            managed |= x.wp & u.managed
        if not managed:
            return
        for k, a in enumerate(rule.consumers):
            if a.kind != "user_group":
                continue
            if rule.action == "allow":
                hint = ("inbound from these users is blocked there unless an address-based rule "
                        "(labels, workload or ip_list consumers) also allows it; pair it with "
                        "one if inbound must be allowed")
            else:
                hint = ("the rule is enforced on the consumer hosts only; pair it with an "
                        "address-based rule if the providers must enforce it too")
            self.add("warning", "user-group-provider-side", f"{rp}.consumers[{k}]",
                     f"user group {a.name!r} is seen on the consumer host only: the firewall of "
                     f"the managed providers ({u.names(managed)}) cannot see users, so {hint}")

    # -- shadowing ----------------------------------------------------------------------------
    def _shadowed(self, subjects: dict[str, list[_Inst]], insts: list[_Inst],
                  u: _Universe) -> None:
        live = [x for x in insts if not x.empty]
        # Coverers bucketed by provider workload set; those with IP-list providers apart
        # (their addresses may cover workloads outside the bit set).
        buckets: dict[int, list[_Inst]] = {}
        with_addresses: list[_Inst] = []
        for x in live:
            if x.ap:
                with_addresses.append(x)
            else:
                buckets.setdefault(x.wp_ip, []).append(x)
        kinds: dict[str, list[tuple[str, str]]] = {
            "allow": [("override_deny", "override"), ("allow", "same")],
            "deny": [("override_deny", "override"), ("deny", "same"), ("allow", "allow")],
            "override_deny": [("override_deny", "same")]}
        for rp, xs in subjects.items():
            mine = [x for x in xs if not x.empty]
            action = xs[0].inst.action
            if not mine or action not in kinds:
                continue
            cands = [self._candidates(x, buckets, with_addresses) for x in mine]
            for cover_action, kind in kinds[action]:
                coverers: list[str] = []
                for x, cs in zip(mine, cands, strict=True):
                    j = self._cover(x, cs, cover_action, same=kind == "same", u=u)
                    if j is None:
                        break
                    if j.inst.rule_id not in coverers:
                        coverers.append(j.inst.rule_id)
                else:
                    self._report_shadow(rp, xs[0].inst, kind, coverers)
                    break

    @staticmethod
    def _candidates(x: _Inst, buckets: dict[int, list[_Inst]],
                    with_addresses: list[_Inst]) -> list[_Inst]:
        need = x.wp_ip
        out: list[_Inst] = []
        for key, members in buckets.items():
            if key & need == need:
                out.extend(members)
        out.extend(with_addresses)
        return out

    def _cover(self, i: _Inst, cands: list[_Inst], action: str, *, same: bool,
               u: _Universe) -> _Inst | None:
        for j in cands:
            if j.inst.action != action or j.inst.rule_path == i.inst.rule_path:
                continue
            if not self._contains(j, i, u):
                continue
            if same and j.inst.index > i.inst.index and self._contains(i, j, u):
                continue  # identical: only the later of the two is redundant
            return j
        return None

    @staticmethod
    def _contains(j: _Inst, i: _Inst, u: _Universe) -> bool:
        """Every flow instance i admits, instance j admits too."""
        extra_p = i.wp_ip & ~j.wp_ip
        if extra_p and not u.ips_in(extra_p, j.ap):
            return False
        extra_c = i.wc_ip & ~j.wc_ip
        if extra_c and not u.ips_in(extra_c, j.ac):
            return False
        users = i.inst.consumers.users
        if users and not (users <= j.inst.consumers.users or j.universal_consumers):
            return False
        if not all(_service_covered(s, j.inst.services) for s in i.inst.services):
            return False
        if i.ap and not u.addresses_in(i.ap, j.ap, j.wp_ip):
            return False
        return not i.ac or u.addresses_in(i.ac, j.ac, j.wc_ip)

    def _report_shadow(self, rp: str, inst: Instance, kind: str, coverers: list[str]) -> None:
        by = ", ".join(repr(c) for c in coverers)
        plural = "s" if len(coverers) > 1 else ""
        rid = inst.rule_id
        if kind == "override":
            what = "allows" if inst.action == "allow" else "denies"
            msg = (f"rule {rid!r} never takes effect: every flow it {what} is blocked by "
                   f"override_deny rule{plural} {by}")
        elif kind == "allow":
            msg = (f"deny rule {rid!r} never blocks anything: every flow it denies is allowed by "
                   f"rule{plural} {by} (the verdict is allowed_across_boundary)")
        else:
            msg = (f"rule {rid!r} is redundant: every flow it matches is matched by "
                   f"{inst.action} rule{plural} {by}")
        self.add("warning", "shadowed", rp, msg)
