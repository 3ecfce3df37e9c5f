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

from bulkhead.dataplane.model import CompiledRule, CompiledWorkload, PeerSet
from bulkhead.domain.addresses import EMPTY, AddressSet
from bulkhead.domain.model import Policy, Workload
from bulkhead.policy.resolve import Instance, ResolvedPolicy, Side, resolve


def side_peers(side: Side, workloads: tuple[Workload, ...]) -> PeerSet:
    hosts = frozenset(ip for w in workloads if side.matches_workload(w) for ip in w.ips)
    return PeerSet(hosts, side.addresses)


def _local_rule(inst: Instance, side: Side, w: Workload, peers: PeerSet,
                *, outbound: bool) -> CompiledRule | None:
    """The rule W gets from `inst` when W is on `side`, or None when it is not."""
    if side.matches_workload(w):
        return CompiledRule(inst.action, peers, inst.services, inst.rule_id, inst.index)
    local = AddressSet.of_ips(ip for ip in w.ips if side.addresses.contains(ip)) if (
        side.addresses) else EMPTY
    if local:
        return CompiledRule(inst.action, peers, inst.services, inst.rule_id, inst.index,
                            local=local)
    if outbound and side.users:
        return CompiledRule(inst.action, peers, inst.services, inst.rule_id, inst.index,
                            users=side.users)
    return None


def compile_workload(w: Workload, resolved: ResolvedPolicy,
                     consumer_peers: list[PeerSet],
                     provider_peers: list[PeerSet]) -> CompiledWorkload:
    inbound: list[CompiledRule] = []
    outbound: list[CompiledRule] = []
    for inst in resolved.instances:
        r_in = _local_rule(inst, inst.providers, w, consumer_peers[inst.index], outbound=False)
        if r_in is not None:
            inbound.append(r_in)
        r_out = _local_rule(inst, inst.consumers, w, provider_peers[inst.index], outbound=True)
        if r_out is not None:
            outbound.append(r_out)
    p = resolved.policy
    return CompiledWorkload(w.name, w.ips, w.enforcement, w.os, p.settings.outbound,
                            tuple(inbound), tuple(outbound))


def compile_naive(policy: Policy) -> dict[str, CompiledWorkload]:
    resolved = resolve(policy)
    cons = [side_peers(i.consumers, policy.workloads) for i in resolved.instances]
    prov = [side_peers(i.providers, policy.workloads) for i in resolved.instances]
    return {w.name: compile_workload(w, resolved, cons, prov) for w in policy.workloads}
