"""Semantic diff of two policies: which (consumer, provider, service) triples change raw verdict.

Theory of operation (docs/design/lint-and-diff.md has the invariants):

- **Endpoints.** A consumer or provider is an address of a workload present in both policies
  (the address must belong to it in both), or an *external class*: an elementary interval cut
  from the boundaries of every IP list of both policies, restricted to addresses some rule's
  IP-list actor uses and represented by one address that belongs to no workload in either
  policy. Users add a third kind of consumer: *user classes* (users with the same group
  memberships in both policies). External-to-external pairs and a workload to itself
  (loopback, essential traffic) are not compared.
- **Membership.** Each endpoint gets, per policy, the set of rule instances that admit it as a
  consumer and as a provider (label/name terms by workload, IP lists by the representative
  address, user groups by a member) - the same tests as `Evaluator.matching`. Endpoints with
  equal (family, old set, new set) form one group, so identical workloads are evaluated once.
- **Service atoms.** The flow space (protocol, port or ICMP type, serving process, unit) is
  cut into atoms at every boundary of every service of both policies: per protocol the
  elementary port intervals (ported protocols 1-65535, ICMP types 0-255), one atom for every
  protocol no spec names, times the process/unit classes (each named process or unit, and
  "other"). Every instance's services become a bit mask over atoms.
- **Verdicts.** For a consumer group and a provider group, the instances matching both (per
  policy) give three masks (override_deny, allow, deny); the raw verdict of every atom follows
  from bit operations (override > allow, + deny = across boundary > deny > no rule). Old and new
  masks intersect into one mask per (before, after) pair.
- **Output.** Group results expand to workload names; a workload's addresses collapse into its
  name when they all agree (else `name (ip)`), external classes with identical results merge
  into one address block (`ip_list:NAME` when it is exactly an IP list), atoms merge back into
  readable specs (`tcp/8000-8099`, `any`).

The diff is exact for the raw verdict: a flow between endpoints present in both policies whose
raw verdict changes is covered by a `Change` with its exact before and after (see the
property test in tests/policy/test_diff.py).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from bulkhead.domain.addresses import AddressSet, canonical_ip, parse_ip
from bulkhead.domain.model import Policy, Workload
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PortSpec
from bulkhead.policy.evaluate import raw_verdict
from bulkhead.policy.resolve import ResolvedService, Resolver, match_labels

ALLOWED_VERDICTS = frozenset({"allowed", "allowed_across_boundary"})


@dataclass(frozen=True)
class Change:
    consumer: str
    provider: str
    service: str
    before: str  # raw verdicts
    after: str

    def to_data(self) -> dict[str, str]:
        return {"consumer": self.consumer, "provider": self.provider, "service": self.service,
                "before": self.before, "after": self.after}


@dataclass(frozen=True)
class PolicyDiff:
    newly_allowed: tuple[Change, ...] = ()
    newly_blocked: tuple[Change, ...] = ()
    changed: tuple[Change, ...] = ()  # other raw-verdict changes (e.g. deny -> no rule)
    enforcement: tuple[tuple[str, str, str], ...] = ()  # (workload, before, after)
    workloads_added: tuple[str, ...] = ()
    workloads_removed: tuple[str, ...] = ()
    addresses: tuple[tuple[str, str, str], ...] = ()  # (workload, before, after), comma lists

    def is_empty(self) -> bool:
        return not (self.newly_allowed or self.newly_blocked or self.changed
                    or self.enforcement or self.workloads_added or self.workloads_removed
                    or self.addresses)

    def to_data(self) -> dict[str, Any]:
        return {
            "newly_allowed": [c.to_data() for c in self.newly_allowed],
            "newly_blocked": [c.to_data() for c in self.newly_blocked],
            "changed": [c.to_data() for c in self.changed],
            "enforcement": [list(e) for e in self.enforcement],
            "workloads_added": list(self.workloads_added),
            "workloads_removed": list(self.workloads_removed),
            "addresses": [list(a) for a in self.addresses],
        }

    def to_text(self) -> str:
        if self.is_empty():
            return "no semantic changes\n"
        lines: list[str] = []
        for mark, changes in (("+", self.newly_allowed), ("-", self.newly_blocked),
                              ("~", self.changed)):
            lines.extend(f"{mark} {c.consumer} -> {c.provider} {c.service} "
                         f"({c.before} -> {c.after})" for c in changes)
        lines.extend(f"~ enforcement {w}: {b} -> {a}" for w, b, a in self.enforcement)
        lines.extend(f"+ workload {w}" for w in self.workloads_added)
        lines.extend(f"- workload {w}" for w in self.workloads_removed)
        lines.extend(f"~ addresses {w}: {b or '-'} -> {a or '-'}" for w, b, a in self.addresses)
        lines.append(f"{len(self.newly_allowed)} newly allowed, {len(self.newly_blocked)} newly "
                     f"blocked, {len(self.changed)} other verdict changes, "
                     f"{len(self.enforcement)} enforcement changes")
        return "\n".join(lines) + "\n"


def diff(old: Policy, new: Policy) -> PolicyDiff:
    return _Differ(old, new).run()


# -- service atoms -----------------------------------------------------------------------------

# Port (or ICMP type) values of a flow per protocol; a flow may also carry no port at all.
PORT_DOMAINS: dict[int, tuple[int, int]] = {
    **{p: (0, 65535) for p in PORTED}, **{p: (0, 255) for p in ICMP_PROTOS}}
Qual = tuple[str | None, str | None]  # (process, unit); None = any other


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Space:
    """The flow space cut into atoms: (protocol, port interval) x (process, unit) class.

    Per protocol some spec names: for ported and ICMP protocols one "no port" atom (a flow
    without a port, or with one outside 0-65535 / ICMP type 0-255: only whole-protocol specs
    match those) and the elementary intervals of 0-65535 (0-255), else one atom; then one atom
    for every protocol that no spec names. Atom (proto, lo, hi): lo None is the "no port" /
    whole-protocol atom, proto None the "other protocols" atom.
    """

    def __init__(self, services: Iterable[ResolvedService]) -> None:
        svcs = set(services)
        specs = {s.spec for s in svcs}
        self.procs: list[str | None] = [None, *sorted({s.process for s in svcs if s.process})]
        self.units: list[str | None] = [None, *sorted({s.unit for s in svcs if s.unit})]
        self.quals: list[Qual] = [(p, u) for p in self.procs for u in self.units]
        self.q = len(self.quals)
        self.all_q = (1 << self.q) - 1
        self.protos = sorted({s.proto for s in specs if s.proto is not None})
        self.atoms: list[tuple[int | None, int | None, int | None]] = []
        self.span: dict[int, tuple[int, int]] = {}
        self.starts: dict[int, list[int]] = {}  # ported/ICMP: first value of each interval
        for p in self.protos:
            first = len(self.atoms)
            self.atoms.append((p, None, None))
            dom = PORT_DOMAINS.get(p)
            if dom is not None:
                cuts = {dom[0], dom[1] + 1}
                for s in specs:
                    if s.proto == p and s.lo is not None and s.hi is not None:
                        cuts.update((max(s.lo, dom[0]), min(s.hi, dom[1]) + 1))
                cs = sorted(c for c in cuts if dom[0] <= c <= dom[1] + 1)
                self.atoms.extend((p, a, b - 1) for a, b in pairwise(cs))
                self.starts[p] = [a for a, _ in pairwise(cs)]
            self.span[p] = (first, len(self.atoms) - 1)
        if len(self.protos) < 256:
            self.atoms.append((None, None, None))  # every protocol no spec names
        self.full = (1 << (len(self.atoms) * self.q)) - 1
        self._cache: dict[ResolvedService, int] = {}
        self._rendered: dict[int, list[str]] = {}

    def mask(self, s: ResolvedService) -> int:
        got = self._cache.get(s)
        if got is None:
            got = self._mask(s)
            self._cache[s] = got
        return got

    def _mask(self, s: ResolvedService) -> int:
        spec = s.spec
        if spec.proto is None:
            a, b = 0, len(self.atoms) - 1
        elif spec.lo is None or spec.hi is None:
            a, b = self.span[spec.proto]
        else:
            first = self.span[spec.proto][0] + 1  # after the "no port" atom
            starts = self.starts[spec.proto]
            a = first + bisect_left(starts, spec.lo)
            b = first + bisect_right(starts, spec.hi) - 1
        qmask = 0
        for i, (proc, unit) in enumerate(self.quals):
            if (s.process is None or proc == s.process) and (s.unit is None or unit == s.unit):
                qmask |= 1 << i
        count = b - a + 1
        if count <= 0 or not qmask:
            return 0
        repeat = ((1 << (count * self.q)) - 1) // ((1 << self.q) - 1)
        return (qmask * repeat) << (a * self.q)

    # -- rendering -------------------------------------------------------------------------
    def render(self, mask: int) -> list[str]:
        """Readable specs covering exactly the atoms of `mask` (memoised)."""
        got = self._rendered.get(mask)
        if got is None:
            got = self._render(mask)
            self._rendered[mask] = got
        return got

    def _render(self, mask: int) -> list[str]:
        if mask == self.full:
            return ["any"]
        per = [(mask >> (i * self.q)) & self.all_q for i in range(len(self.atoms))]
        if all(per) and len(set(per)) == 1:
            return ["any" + q for q in self._quals(per[0])]
        out: list[str] = []
        i = 0
        while i < len(self.atoms):
            qm = per[i]
            proto, lo, _ = self.atoms[i]
            if not qm:
                i += 1
                continue
            j = i
            if proto is not None and lo is None:
                end = self.span[proto][1]
                if all(per[k] == qm for k in range(i, end + 1)):
                    j = end  # the whole protocol
            else:
                while (proto is not None and j + 1 < len(self.atoms)
                       and self.atoms[j + 1][0] == proto and per[j + 1] == qm):
                    j += 1
            text = self._spec_text(i, j)
            out.extend(text + q for q in self._quals(qm))
            i = j + 1
        return out

    def _spec_text(self, i: int, j: int) -> str:
        proto, lo, _ = self.atoms[i]
        if proto is None:
            return "any except " + ", ".join(str(PortSpec(p)) for p in self.protos)
        if (i, j) == self.span[proto]:
            return str(PortSpec(proto))
        if lo is None:
            return f"{PortSpec(proto)} ({'no type' if proto in ICMP_PROTOS else 'no port'})"
        return str(PortSpec(proto, lo, self.atoms[j][2]))

    def _quals(self, qm: int) -> list[str]:
        if qm == self.all_q:
            return [""]
        chosen = [self.quals[i] for i in _bits(qm)]
        procs = list(dict.fromkeys(p for p, _ in chosen))
        units = list(dict.fromkeys(u for _, u in chosen))
        if len(chosen) == len(procs) * len(units):  # a product: factor it
            ps = [""] if len(procs) == len(self.procs) else [
                self._qual("process", p, self.procs) for p in procs]
            us = [""] if len(units) == len(self.units) else [
                self._qual("unit", u, self.units) for u in units]
            return [a + b for a in ps for b in us]
        return [self._qual("process", p, self.procs) + self._qual("unit", u, self.units)
                for p, u in chosen]

    @staticmethod
    def _qual(kind: str, value: str | None, values: list[str | None]) -> str:
        if len(values) == 1:
            return ""
        if value is not None:
            return f" {kind}={value}"
        named = [v for v in values if v is not None]
        if len(named) == 1:
            return f" {kind}!={named[0]}"
        return f" {kind} not in {{{','.join(named)}}}"


# -- membership per policy ---------------------------------------------------------------------

Sets = tuple[frozenset[int], frozenset[int]]  # (as consumer, as provider)
GroupKey = tuple[int, frozenset[int], frozenset[int]]  # (family, old set, new set) of one side
LabelSet = tuple[tuple[str, str], ...]


class _Index:
    """Which rule instances of one policy admit a workload, an address or a user.

    Label terms are evaluated once per distinct label set ("identity") with posting bit sets
    (OR over a key's values, AND over keys); IP lists once per elementary address interval of
    the policy's instance address sets, looked up by bisection.
    """

    def __init__(self, policy: Policy) -> None:
        self.resolver = Resolver(policy)
        self.resolved = self.resolver.resolve()
        self.instances = self.resolved.instances
        self.named: dict[str, list[int]] = {}
        for inst in self.instances:
            for t in (*inst.consumers.terms, *inst.providers.terms):
                if t.name is not None:
                    self.named.setdefault(t.name, []).append(inst.index)
        self.addr_cons = [(i.index, i.consumers.addresses) for i in self.instances
                          if i.consumers.addresses]
        self.addr_prov = [(i.index, i.providers.addresses) for i in self.instances
                          if i.providers.addresses]
        self.user_cons = [(i.index, i.consumers.users) for i in self.instances
                          if i.consumers.users]
        self._identity = self._identities(policy.workloads)
        self._intervals = {v: self._classes(v) for v in (4, 6)}

    def _identities(self, workloads: tuple[Workload, ...]) -> dict[LabelSet, Sets]:
        ids = list(dict.fromkeys(w.labels for w in workloads))
        post: dict[str, dict[str, int]] = {}
        for k, labels in enumerate(ids):
            for key, value in labels:
                d = post.setdefault(key, {})
                d[value] = d.get(value, 0) | (1 << k)
        everyone = (1 << len(ids)) - 1
        members: tuple[list[list[int]], list[list[int]]] = (
            [[] for _ in ids], [[] for _ in ids])
        cache: dict[tuple[tuple[str, frozenset[str]], ...], int] = {}
        for inst in self.instances:
            for side, terms in ((0, inst.consumers.terms), (1, inst.providers.terms)):
                bits = 0
                for t in terms:
                    if t.name is not None:
                        continue
                    got = cache.get(t.match)
                    if got is None:
                        got = everyone
                        for key, values in t.match:
                            d = post.get(key, {})
                            vb = 0
                            for v in values:
                                vb |= d.get(v, 0)
                            got &= vb
                        cache[t.match] = got
                    bits |= got
                for k in _bits(bits):
                    members[side][k].append(inst.index)
        return {labels: (frozenset(members[0][k]), frozenset(members[1][k]))
                for k, labels in enumerate(ids)}

    def _classes(self, version: int) -> tuple[list[int], list[Sets]]:
        """Elementary intervals (their first addresses) and their instance sets."""
        cuts = {0}
        for _, a in (*self.addr_cons, *self.addr_prov):
            for lo, hi in a.v4 if version == 4 else a.v6:
                cuts.update((lo, hi + 1))
        starts = sorted(cuts)
        sets = [(frozenset(i for i, a in self.addr_cons if a.contains_int(version, lo)),
                 frozenset(i for i, a in self.addr_prov if a.contains_int(version, lo)))
                for lo in starts]
        return starts, sets

    def workload(self, w: Workload) -> Sets:
        got = self._identity.get(w.labels)
        if got is None:  # not one of this policy's workloads: evaluate its terms directly
            lab = w.label_dict
            got = (frozenset(i.index for i in self.instances if any(
                       t.name is None and match_labels(t.match, lab) for t in i.consumers.terms)),
                   frozenset(i.index for i in self.instances if any(
                       t.name is None and match_labels(t.match, lab) for t in i.providers.terms)))
            self._identity[w.labels] = got
        named = self.named.get(w.name)
        if not named:
            return got
        lab = w.label_dict
        cons_n = {idx for idx in named if self.instances[idx].consumers.matches_workload(w, lab)}
        prov_n = {idx for idx in named if self.instances[idx].providers.matches_workload(w, lab)}
        return got[0] | cons_n, got[1] | prov_n

    def address(self, version: int, value: int) -> Sets:
        starts, sets = self._intervals[version]
        return sets[bisect_right(starts, value) - 1]

    def user(self, user: str) -> frozenset[int]:
        return frozenset(i for i, users in self.user_cons if user in users)


# -- endpoints ---------------------------------------------------------------------------------

Entity = tuple[str, str]  # ("w", workload) | ("x", class id) | ("u", user-class label)
Key = tuple[str, str]  # (before, after)
Label = tuple[str, str]  # ("s", final text) | ("x", class id)


@dataclass(frozen=True)
class _End:
    entity: Entity
    family: int
    ip: str  # the address flows use ("*" for a user class's virtual source)
    old: Sets
    new: Sets


@dataclass(frozen=True)
class _Class:
    family: int
    lo: int
    hi: int
    rep: int


class _Differ:
    def __init__(self, old: Policy, new: Policy) -> None:
        self.old_p, self.new_p = old, new
        self.old, self.new = _Index(old), _Index(new)
        self.space = _Space(s for ix in (self.old, self.new) for i in ix.instances
                            for s in i.services)
        self.svc = [[0] * len(ix.instances) for ix in (self.old, self.new)]
        for k, ix in enumerate((self.old, self.new)):
            for inst in ix.instances:
                m = 0
                for s in inst.services:
                    m |= self.space.mask(s)
                self.svc[k][inst.index] = m
        self.actions = [[i.action for i in ix.instances] for ix in (self.old, self.new)]
        self._changes: dict[tuple[frozenset[int], frozenset[int]], dict[Key, int]] = {}
        self.counts: dict[Entity, dict[int, int]] = {}
        self.multi: set[str] = set()  # workloads with more than one compared address
        self.classes: list[_Class] = []
        self._canon: dict[str, str | None] = {}

    def _canonical(self, ips: Iterable[str]) -> list[str]:
        """Canonical addresses (invalid ones dropped), first occurrence order."""
        out = []
        for ip in ips:
            if ip not in self._canon:
                try:
                    self._canon[ip] = canonical_ip(ip)
                except ValueError:
                    self._canon[ip] = None
            c = self._canon[ip]
            if c is not None:
                out.append(c)
        return list(dict.fromkeys(out))

    # -- verdict algebra ---------------------------------------------------------------------
    def _verdicts(self, k: int, matched: frozenset[int]) -> dict[str, int]:
        o = a = d = 0
        for idx in matched:
            act = self.actions[k][idx]
            if act == "override_deny":
                o |= self.svc[k][idx]
            elif act == "allow":
                a |= self.svc[k][idx]
            elif act == "deny":
                d |= self.svc[k][idx]
        full = self.space.full
        out = {
            raw_verdict(True, False, False): o,
            raw_verdict(False, True, False): a & ~o & ~d,
            raw_verdict(False, True, True): a & d & ~o,
            raw_verdict(False, False, True): d & ~a & ~o,
            raw_verdict(False, False, False): full & ~(o | a | d),
        }
        return {v: m for v, m in out.items() if m}

    def changes(self, m_old: frozenset[int], m_new: frozenset[int]) -> dict[Key, int]:
        key = (m_old, m_new)
        got = self._changes.get(key)
        if got is None:
            got = {}
            if m_old or m_new:
                before, after = self._verdicts(0, m_old), self._verdicts(1, m_new)
                for b, mb in before.items():
                    for a, ma in after.items():
                        if b != a and mb & ma:
                            got[(b, a)] = mb & ma
            self._changes[key] = got
        return got

    def pair(self, c: _End, p: _End) -> dict[Key, int]:
        return self.changes(c.old[0] & p.old[1], c.new[0] & p.new[1])

    # -- endpoints ---------------------------------------------------------------------------
    def _workload_endpoints(self) -> list[_End]:
        old_w = {w.name: w for w in reversed(self.old_p.workloads)}
        new_w = {w.name: w for w in reversed(self.new_p.workloads)}
        out: list[_End] = []
        for name in [w.name for w in self.new_p.workloads if w.name in old_w]:
            if ("w", name) in self.counts:
                continue
            wo, wn = old_w[name], new_w[name]
            ips_o, ips_n = self._canonical(wo.ips), self._canonical(wn.ips)
            common = [ip for ip in ips_n if ip in ips_o]
            counts: dict[int, int] = {4: 0, 6: 0}
            so, sn = self.old.workload(wo), self.new.workload(wn)
            for ip in common:
                addr = parse_ip(ip)
                v, n = addr.version, int(addr)
                counts[v] += 1
                ao, an = self.old.address(v, n), self.new.address(v, n)
                out.append(_End(("w", name), v, ip, (so[0] | ao[0], so[1] | ao[1]),
                                (sn[0] | an[0], sn[1] | an[1])))
            self.counts[("w", name)] = counts
            if len(common) > 1:
                self.multi.add(name)
        return out

    def _external_endpoints(self) -> list[_End]:
        used = AddressSet()
        for ix in (self.old, self.new):
            for _, s in (*ix.addr_cons, *ix.addr_prov):
                used = used | s
        if not used:
            return []
        taken: set[tuple[int, int]] = set()
        for p in (self.old_p, self.new_p):
            for w in p.workloads:
                for ip in self._canonical(w.ips):
                    addr = parse_ip(ip)
                    taken.add((addr.version, int(addr)))
        lists = [s for ix in (self.old, self.new) for s in ix.resolver.ip_lists.values()]
        out: list[_End] = []
        for family in (4, 6):
            cuts: set[int] = set()
            for s in lists:
                for lo, hi in s.v4 if family == 4 else s.v6:
                    cuts.update((lo, hi + 1))
            for lo, hi in used.v4 if family == 4 else used.v6:
                points = sorted({lo, hi + 1, *(c for c in cuts if lo < c <= hi)})
                for a, b in pairwise(points):
                    rep = a
                    while rep < b and (family, rep) in taken:
                        rep += 1
                    if rep >= b:
                        continue
                    cid = str(len(self.classes))
                    self.classes.append(_Class(family, a, b - 1, rep))
                    self.counts[("x", cid)] = {family: 1}
                    out.append(_End(("x", cid), family, str(rep),
                                    (self.old.address(family, rep)),
                                    (self.new.address(family, rep))))
        return out

    def _user_classes(self) -> list[tuple[str, frozenset[int], frozenset[int]]]:
        """(label, old instances, new instances) per class of users with equal memberships."""
        if not (self.old.user_cons or self.new.user_cons):
            return []
        members: dict[str, tuple[set[str], set[str]]] = {}
        for k, p in enumerate((self.old_p, self.new_p)):
            for g in p.user_groups:
                for user in g.members:
                    members.setdefault(user, (set(), set()))[k].add(g.name)
        classes: dict[tuple[frozenset[str], frozenset[str]], list[str]] = defaultdict(list)
        for user, (in_old, in_new) in sorted(members.items()):
            classes[(frozenset(in_old), frozenset(in_new))].append(user)
        out = []
        labels: dict[str, int] = defaultdict(int)
        raw = []
        for (go, gn), users in classes.items():
            rep = users[0]
            io, inew = self.old.user(rep), self.new.user(rep)
            if not io and not inew:
                continue
            label = "+".join(sorted(go | gn))
            labels[label] += 1
            raw.append((label, users, io, inew))
        for label, users, io, inew in raw:
            text = label if labels[label] == 1 else f"{label}[{','.join(users)}]"
            out.append((text, io, inew))
        return out

    # -- main --------------------------------------------------------------------------------
    def run(self) -> PolicyDiff:
        ends = self._workload_endpoints() + self._external_endpoints()
        rows: dict[tuple[Entity, Entity], dict[tuple[str, str], dict[Key, int]]] = (
            defaultdict(dict))
        cgroups = _group(ends, consumer=True)
        pgroups = _group(ends, consumer=False)
        by_inst: list[dict[int, set[int]]] = [defaultdict(set), defaultdict(set)]
        for gi, (_, members) in enumerate(pgroups):
            for k in (0, 1):
                sets = members[0].old if k == 0 else members[0].new
                for idx in sets[1]:
                    by_inst[k][idx].add(gi)
        for (family, _, _), cmembers in cgroups:
            c0 = cmembers[0]
            cands: set[int] = set()
            for k, sets in ((0, c0.old), (1, c0.new)):
                for idx in sets[0]:
                    cands |= by_inst[k].get(idx, set())
            for gi in sorted(cands):
                (pfam, _, _), pmembers = pgroups[gi]
                if pfam != family:
                    continue
                ch = self.pair(c0, pmembers[0])
                if ch:
                    self._expand(rows, cmembers, pmembers, ch)
        self._users(rows, cgroups, pgroups)
        return self._result(rows)

    def _expand(self, rows: dict[tuple[Entity, Entity], dict[tuple[str, str], dict[Key, int]]],
                cmembers: list[_End], pmembers: list[_End], ch: dict[Key, int]) -> None:
        for c in cmembers:
            for p in pmembers:
                if c.entity[0] == "x" and p.entity[0] == "x":
                    continue  # nobody enforces between two external addresses
                if c.entity == p.entity:
                    continue  # a workload to itself is loopback
                rows[(c.entity, p.entity)][(c.ip, p.ip)] = ch

    def _users(self, rows: dict[tuple[Entity, Entity], dict[tuple[str, str], dict[Key, int]]],
               cgroups: list[tuple[GroupKey, list[_End]]],
               pgroups: list[tuple[GroupKey, list[_End]]]) -> None:
        """Flows by users of user groups, where they differ from flows without a user."""
        for label, u_old, u_new in self._user_classes():
            ent: Entity = ("u", f"user_group:{label}")
            self.counts[ent] = {4: 1, 6: 1}
            for (pfam, _, _), pmembers in pgroups:
                p0 = pmembers[0]
                virtual = self.changes(u_old & p0.old[1], u_new & p0.new[1])
                if virtual:
                    for p in pmembers:
                        rows[(ent, p.entity)][("*", p.ip)] = virtual
                for (cfam, _, _), cmembers in cgroups:
                    if cfam != pfam:
                        continue
                    c0 = cmembers[0]
                    base = self.pair(c0, p0)
                    mine = self.changes((c0.old[0] | u_old) & p0.old[1],
                                        (c0.new[0] | u_new) & p0.new[1])
                    extra = {key: m & ~base.get(key, 0) & ~virtual.get(key, 0)
                             for key, m in mine.items()}
                    extra = {key: m for key, m in extra.items() if m}
                    if not extra:
                        continue
                    for c in cmembers:
                        src = self._source_label(c)
                        sub: Entity = ("u", f"user_group:{label}@{src}")
                        self.counts[sub] = self.counts[c.entity]
                        for p in pmembers:
                            if c.entity != p.entity and not (
                                    c.entity[0] == "x" and p.entity[0] == "x"):
                                rows[(sub, p.entity)][(c.ip, p.ip)] = extra

    def _source_label(self, c: _End) -> str:
        if c.entity[0] == "x":
            return self._ext_label([c.entity[1]])
        return c.entity[1]

    # -- output ------------------------------------------------------------------------------
    def _label(self, e: Entity, ip: str | None) -> Label:
        if e[0] == "x":
            return ("x", e[1])
        if e[0] == "w" and ip is not None and e[1] in self.multi:
            return ("s", f"{e[1]} ({ip})")
        return ("s", e[1])

    def _result(self, rows: dict[tuple[Entity, Entity], dict[tuple[str, str], dict[Key, int]]]
                ) -> PolicyDiff:
        collapsed: dict[tuple[Label, Label], dict[Key, int]] = defaultdict(
            lambda: defaultdict(int))
        for (ce, pe), subs in rows.items():
            cc, pc = self.counts[ce], self.counts[pe]
            total = sum(cc.get(f, 0) * pc.get(f, 0) for f in (4, 6))
            agree: dict[Key, int] = {}
            if len(subs) == total:
                keys = {k for masks in subs.values() for k in masks}
                for key in keys:
                    m = self.space.full
                    for masks in subs.values():
                        m &= masks.get(key, 0)
                    if m:
                        agree[key] = m
            if agree:
                row = collapsed[(self._label(ce, None), self._label(pe, None))]
                for key, m in agree.items():
                    row[key] |= m
            for (cip, pip), masks in subs.items():
                for key, m in masks.items():
                    rest = m & ~agree.get(key, 0)
                    if rest:
                        collapsed[(self._label(ce, cip), self._label(pe, pip))][key] |= rest
        final: dict[tuple[str, str], dict[Key, int]] = defaultdict(lambda: defaultdict(int))
        ext_c: dict[tuple[str, frozenset[tuple[Key, int]]], list[str]] = defaultdict(list)
        ext_p: dict[tuple[str, frozenset[tuple[Key, int]]], list[str]] = defaultdict(list)
        for (cl, pl), masks in collapsed.items():
            frozen = frozenset(masks.items())
            if cl[0] == "x":
                ext_c[(pl[1], frozen)].append(cl[1])
            elif pl[0] == "x":
                ext_p[(cl[1], frozen)].append(pl[1])
            else:
                for key, m in masks.items():
                    final[(cl[1], pl[1])][key] |= m
        for (pl_text, frozen), cids in ext_c.items():
            for key, m in frozen:
                final[(self._ext_label(cids), pl_text)][key] |= m
        for (cl_text, frozen), cids in ext_p.items():
            for key, m in frozen:
                final[(cl_text, self._ext_label(cids))][key] |= m
        allowed, blocked, other = [], [], []
        for (cons, prov), masks in final.items():
            for (before, after), m in masks.items():
                for svc in self.space.render(m):
                    ch = Change(cons, prov, svc, before, after)
                    if before not in ALLOWED_VERDICTS and after in ALLOWED_VERDICTS:
                        allowed.append(ch)
                    elif before in ALLOWED_VERDICTS and after not in ALLOWED_VERDICTS:
                        blocked.append(ch)
                    else:
                        other.append(ch)
        return PolicyDiff(_sorted(allowed), _sorted(blocked), _sorted(other),
                          *self._workload_changes())

    def _ext_label(self, cids: list[str]) -> str:
        v4 = [(c.lo, c.hi) for c in (self.classes[int(i)] for i in cids) if c.family == 4]
        v6 = [(c.lo, c.hi) for c in (self.classes[int(i)] for i in cids) if c.family == 6]
        block = AddressSet.build(v4, v6)
        for p, ix in ((self.new_p, self.new), (self.old_p, self.old)):
            for x in p.ip_lists:
                if ix.resolver.ip_lists.get(x.name) == block:
                    return f"ip_list:{x.name}"
        cidrs = [*block.cidrs(4), *block.cidrs(6)]
        text = ", ".join(cidrs) if len(cidrs) <= 4 else ", ".join(block.describe())
        inside = sorted({x.name for p, ix in ((self.new_p, self.new), (self.old_p, self.old))
                         for x in p.ip_lists
                         if not block - ix.resolver.ip_lists.get(x.name, AddressSet())})
        return f"{text} [in {', '.join(inside)}]" if inside else text

    def _workload_changes(self) -> tuple[tuple[tuple[str, str, str], ...], tuple[str, ...],
                                         tuple[str, ...], tuple[tuple[str, str, str], ...]]:
        old_w = {w.name: w for w in reversed(self.old_p.workloads)}
        new_w = {w.name: w for w in reversed(self.new_p.workloads)}
        enforcement, addresses = [], []
        for name in sorted(set(old_w) & set(new_w)):
            so, sn = _state(old_w[name]), _state(new_w[name])
            if so != sn:
                enforcement.append((name, so, sn))
            ips_o, ips_n = self._canonical(old_w[name].ips), self._canonical(new_w[name].ips)
            if sorted(ips_o) != sorted(ips_n):
                addresses.append((name, ", ".join(ips_o), ", ".join(ips_n)))
        return (tuple(enforcement), tuple(sorted(set(new_w) - set(old_w))),
                tuple(sorted(set(old_w) - set(new_w))), tuple(addresses))


def _group(ends: list[_End], *, consumer: bool) -> list[tuple[GroupKey, list[_End]]]:
    """Endpoints with the same family and the same instance sets (on one side) behave alike."""
    k = 0 if consumer else 1
    groups: dict[GroupKey, list[_End]] = {}
    for e in ends:
        groups.setdefault((e.family, e.old[k], e.new[k]), []).append(e)
    return list(groups.items())


def _state(w: Workload) -> str:
    return w.enforcement if w.managed else "unmanaged"


def _service_key(service: str) -> tuple[int, int, str]:
    """Protocol number, then first port: `tcp/80` before `tcp/443`; `any…` first."""
    head = service.split(" ", 1)[0]
    try:
        spec = PortSpec.parse(head)
    except ValueError:
        return (256, 0, service)
    return (spec.proto if spec.proto is not None else -1, spec.lo or 0, service)


def _sorted(changes: list[Change]) -> tuple[Change, ...]:
    keys: dict[str, tuple[int, int, str]] = {}
    for c in changes:
        if c.service not in keys:
            keys[c.service] = _service_key(c.service)
    return tuple(sorted(changes, key=lambda c: (c.consumer, c.provider, keys[c.service],
                                                c.before, c.after)))
