"""Compiling a policy into each workload's `CompiledWorkload`.

Two implementations with one output:
- `compile_naive(policy)`: for every workload, walk every rule instance. Obviously right; the
  oracle for the incremental compiler.
- `Compiler`: resolves each rule instance's peer address sets once, groups workloads by their
  label set ("identity") so selector matching runs once per identity rather than once per
  workload, and keeps enough indexes that a workload or label change recompiles only the
  workloads it affects (`Compiler.update_workload` / `remove_workload`).
"""

from __future__ import annotations

from dataclasses import replace

from bulkhead.dataplane.model import CompiledRule, CompiledWorkload, PeerSet
from bulkhead.domain.addresses import EMPTY, AddressSet, parse_ip
from bulkhead.domain.model import Policy, Workload
from bulkhead.policy.resolve import Instance, Match, ResolvedPolicy, Side, match_labels, resolve


def side_peers(side: Side, workloads: tuple[Workload, ...]) -> PeerSet:
    hosts = frozenset(ip for w in workloads if side.matches_workload(w) for ip in w.ips)
    return PeerSet(hosts, side.addresses)


def _local_rules(inst: Instance, side: Side, w: Workload, peers: PeerSet,
                 *, outbound: bool, term_member: bool | None = None) -> list[CompiledRule]:
    """The rules W gets from `inst` when W is on `side` (none when it is not).
    `term_member`, when known, says whether W matches one of the side's terms."""
    base = (inst.action, peers, inst.services, inst.rule_id, inst.index)
    if term_member if term_member is not None else side.matches_workload(w):
        return [CompiledRule(*base)]
    out = []
    local = AddressSet.of_ips(ip for ip in w.ips if side.addresses.contains(ip)) if (
        side.addresses) else EMPTY
    if local:
        out.append(CompiledRule(*base, local=local))
    if outbound and side.users:
        out.append(CompiledRule(*base, users=side.users))
    return out


def compile_workload(w: Workload, resolved: ResolvedPolicy,
                     consumer_peers: list[PeerSet],
                     provider_peers: list[PeerSet]) -> CompiledWorkload:
    inbound: list[CompiledRule] = []
    outbound: list[CompiledRule] = []
    for inst in resolved.instances:
        inbound += _local_rules(inst, inst.providers, w, consumer_peers[inst.index],
                                outbound=False)
        outbound += _local_rules(inst, inst.consumers, w, provider_peers[inst.index],
                                 outbound=True)
    p = resolved.policy
    return CompiledWorkload(w.name, w.ips, w.enforcement, w.os, p.settings.outbound,
                            tuple(inbound), tuple(outbound))


def compile_naive(policy: Policy) -> dict[str, CompiledWorkload]:
    resolved = resolve(policy)
    cons = [side_peers(i.consumers, policy.workloads) for i in resolved.instances]
    prov = [side_peers(i.providers, policy.workloads) for i in resolved.instances]
    return {w.name: compile_workload(w, resolved, cons, prov) for w in policy.workloads}


LabelSet = tuple[tuple[str, str], ...]


class SideIndex:
    """Membership of workloads in one side (consumers or providers) of every instance."""

    def __init__(self, instances: tuple[Instance, ...], provider: bool) -> None:
        self.instances = instances
        self.provider = provider
        self.by_identity: dict[LabelSet, frozenset[int]] = {}
        self.named: dict[str, list[int]] = {}  # workload name -> instances naming it
        self.with_users = [i.index for i in instances if self.side(i).users]
        self.users_set = frozenset(self.with_users)
        # instances grouped by their (shared) IP-list address set: membership by address is
        # computed once per distinct set
        self.by_addresses: dict[AddressSet, list[int]] = {}
        for i in instances:
            if self.side(i).addresses:
                self.by_addresses.setdefault(self.side(i).addresses, []).append(i.index)
        # nameless terms indexed by one pivot (key, value); terms matching everything apart
        self.pivot: dict[tuple[str, str], list[tuple[int, Match]]] = {}
        self.always: list[int] = []
        for inst in instances:
            for t in self.side(inst).terms:
                if t.name is not None:
                    self.named.setdefault(t.name, []).append(inst.index)
                elif not t.match:
                    self.always.append(inst.index)
                else:
                    key, values = min(t.match, key=lambda kv: len(kv[1]))
                    for v in values:
                        self.pivot.setdefault((key, v), []).append((inst.index, t.match))
        self.members: list[set[str]] = [set() for _ in instances]  # matched by a term
        self.local: list[set[str]] = [set() for _ in instances]  # matched by own address

    def side(self, inst: Instance) -> Side:
        return inst.providers if self.provider else inst.consumers

    def identity(self, labels: LabelSet) -> frozenset[int]:
        got = self.by_identity.get(labels)
        if got is None:
            lab = dict(labels)
            found = set(self.always)
            for kv in labels:
                for idx, match in self.pivot.get(kv, ()):
                    if idx not in found and match_labels(match, lab):
                        found.add(idx)
            got = frozenset(found)
            self.by_identity[labels] = got
        return got

    def term_member_of(self, w: Workload) -> set[int]:
        out = set(self.identity(w.labels))
        lab = w.label_dict
        for idx in self.named.get(w.name, ()):
            if any(t.name == w.name and match_labels(t.match, lab)
                   for t in self.side(self.instances[idx]).terms):
                out.add(idx)
        return out

    def local_member_of(self, w: Workload) -> set[int]:
        if not self.by_addresses or not w.ips:
            return set()
        parsed = [(a.version, int(a)) for a in map(parse_ip, w.ips)]
        out: set[int] = set()
        for addrs, idxs in self.by_addresses.items():
            if any(addrs.contains_int(v, n) for v, n in parsed):
                out.update(idxs)
        return out


class Compiler:
    """Full compile once, then incremental updates; output always equals `compile_naive`."""

    def __init__(self, policy: Policy) -> None:
        self.resolved = resolve(policy)
        self.settings = policy.settings
        self.workloads: dict[str, Workload] = {}
        self.cons = SideIndex(self.resolved.instances, provider=False)
        self.prov = SideIndex(self.resolved.instances, provider=True)
        self.member_of: dict[str, tuple[set[int], set[int], set[int], set[int]]] = {}
        for w in policy.workloads:
            self._add(w)
        n = len(self.resolved.instances)
        self.cons_peers: list[PeerSet] = [self._peers(self.cons, i) for i in range(n)]
        self.prov_peers: list[PeerSet] = [self._peers(self.prov, i) for i in range(n)]
        self.compiled: dict[str, CompiledWorkload] = {
            name: self._compile(w) for name, w in self.workloads.items()}

    # -- state ----------------------------------------------------------------------------
    def _add(self, w: Workload) -> None:
        self.workloads[w.name] = w
        sets = (self.cons.term_member_of(w), self.prov.term_member_of(w),
                self.cons.local_member_of(w), self.prov.local_member_of(w))
        self.member_of[w.name] = sets
        for idx in sets[0]:
            self.cons.members[idx].add(w.name)
        for idx in sets[1]:
            self.prov.members[idx].add(w.name)
        for idx in sets[2]:
            self.cons.local[idx].add(w.name)
        for idx in sets[3]:
            self.prov.local[idx].add(w.name)

    def _drop(self, name: str) -> None:
        self.workloads.pop(name)
        c, p, lc, lp = self.member_of.pop(name)
        for idx in c:
            self.cons.members[idx].discard(name)
        for idx in p:
            self.prov.members[idx].discard(name)
        for idx in lc:
            self.cons.local[idx].discard(name)
        for idx in lp:
            self.prov.local[idx].discard(name)

    def _peers(self, index: SideIndex, idx: int) -> PeerSet:
        hosts = frozenset(ip for name in index.members[idx] for ip in self.workloads[name].ips)
        return PeerSet(hosts, index.side(self.resolved.instances[idx]).addresses)

    def _compile(self, w: Workload) -> CompiledWorkload:
        c, p, lc, lp = self.member_of[w.name]
        inst = self.resolved.instances
        inbound: list[CompiledRule] = []
        for idx in sorted(p | lp):
            inbound += _local_rules(inst[idx], inst[idx].providers, w, self.cons_peers[idx],
                                    outbound=False, term_member=idx in p)
        outbound: list[CompiledRule] = []
        for idx in sorted(c | lc | self.cons.users_set):
            outbound += _local_rules(inst[idx], inst[idx].consumers, w, self.prov_peers[idx],
                                     outbound=True, term_member=idx in c)
        return CompiledWorkload(w.name, w.ips, w.enforcement, w.os, self.settings.outbound,
                                tuple(inbound), tuple(outbound))

    # -- incremental updates ---------------------------------------------------------------
    def update_workload(self, w: Workload) -> set[str]:
        """Add or replace one workload; returns the names whose compiled policy changed."""
        old = self.workloads.get(w.name)
        old_sets = self.member_of.get(w.name, (set(), set(), set(), set()))
        if old is not None:
            self._drop(w.name)
        self._add(w)
        new_sets = self.member_of[w.name]
        same_ips = old is not None and old.ips == w.ips
        return self._refresh(w.name, old_sets, new_sets, same_ips)

    def remove_workload(self, name: str) -> set[str]:
        """Remove one workload; returns the names whose compiled policy changed (not `name`)."""
        if name not in self.workloads:
            return set()
        old_sets = self.member_of[name]
        self._drop(name)
        changed = self._refresh(name, old_sets, (set(), set(), set(), set()), False)
        self.compiled.pop(name, None)
        changed.discard(name)
        return changed

    def _refresh(self, name: str, old: tuple[set[int], ...], new: tuple[set[int], ...],
                 same_ips: bool) -> set[str]:
        cons_changed = (old[0] ^ new[0]) if same_ips else (old[0] | new[0])
        prov_changed = (old[1] ^ new[1]) if same_ips else (old[1] | new[1])
        # other workloads keep their memberships: only the peers of these instances move
        peers_in: set[int] = set()  # inbound rules whose consumer peers changed
        peers_out: set[int] = set()  # outbound rules whose provider peers changed
        todo: set[str] = set()
        for idx in cons_changed:
            self.cons_peers[idx] = self._peers(self.cons, idx)
            peers_in.add(idx)
            todo |= self.prov.members[idx] | self.prov.local[idx]
        for idx in prov_changed:
            self.prov_peers[idx] = self._peers(self.prov, idx)
            peers_out.add(idx)
            todo |= self.cons.members[idx] | self.cons.local[idx]
            if idx in self.cons.users_set:
                todo |= set(self.workloads)
        changed = set()
        if name in self.workloads:
            cw = self._compile(self.workloads[name])
            if self.compiled.get(name) != cw:
                self.compiled[name] = cw
                changed.add(name)
        todo.discard(name)
        for n in todo:
            old_cw = self.compiled[n]
            cw = replace(old_cw,
                         inbound=self._repeer(old_cw.inbound, peers_in, self.cons_peers),
                         outbound=self._repeer(old_cw.outbound, peers_out, self.prov_peers))
            if cw != old_cw:
                self.compiled[n] = cw
                changed.add(n)
        return changed

    @staticmethod
    def _repeer(rules: tuple[CompiledRule, ...], moved: set[int],
                peers: list[PeerSet]) -> tuple[CompiledRule, ...]:
        if not moved:
            return rules
        return tuple(replace(r, peers=peers[r.instance]) if r.instance in moved else r
                     for r in rules)

    def policy(self) -> Policy:
        """The policy as it stands after the updates (workloads in name order)."""
        return replace(self.resolved.policy,
                       workloads=tuple(self.workloads[n] for n in sorted(self.workloads)))
