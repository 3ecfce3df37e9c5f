"""What one workload must enforce: the compiled policy, before any firewall syntax.

Theory of operation: for a workload W, `inbound` holds one rule per rule instance in which W is a
provider (peers = the instance's consumer addresses), `outbound` one per instance in which W is
a consumer (peers = the instance's provider addresses). Actions keep their order-free
precedence (override_deny > allow > deny > default); renderers lay them out as ordered chains
and map the enforcement state. `local` narrows a rule to some of W's own addresses (when W is
matched by an IP list rather than by labels); `users` narrows an outbound rule to the users of a
user group. Host facts that only the agent knows (the control-plane address, cgroup paths of
processes and units, uids) travel separately as `HostContext`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from bulkhead.domain.addresses import EMPTY, AddressSet
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.resolve import ResolvedService


@dataclass(frozen=True)
class PeerSet:
    """Remote addresses of a rule: workload addresses (rendered as hash sets, cheap to update
    one by one) and IP-list networks (rendered as interval sets)."""

    hosts: frozenset[str] = frozenset()
    nets: AddressSet = EMPTY

    def contains(self, ip: str) -> bool:
        return ip in self.hosts or self.nets.contains(ip)

    def __bool__(self) -> bool:
        return bool(self.hosts) or bool(self.nets)

    def host_list(self, version: int) -> list[str]:
        """Hosts of one IP version, sorted numerically."""
        return sorted((h for h in self.hosts if (":" in h) == (version == 6)),
                      key=lambda h: int(ipaddress.ip_address(h)))

    def describe(self) -> list[str]:
        return sorted(self.hosts, key=lambda h: (":" in h, int(ipaddress.ip_address(h)))) + (
            self.nets.describe())


def family_hosts(hosts: Iterable[str], version: int) -> tuple[str, ...]:
    """Hosts of one IP version: validated, canonical, numerically sorted, without repeats.
    Raises ValueError naming a host that is not an address of that version."""
    af = socket.AF_INET6 if version == 6 else socket.AF_INET
    packed: set[bytes] = set()
    for h in hosts:
        if (":" in h) != (version == 6):
            continue
        try:
            packed.add(socket.inet_pton(af, h))
        except OSError:
            raise ValueError(f"peer is not an IP address (IPv{version}): {h!r}") from None
    return tuple(socket.inet_ntop(af, p) for p in sorted(packed))


@dataclass(frozen=True)
class CompiledRule:
    action: str  # allow | deny | override_deny
    peers: PeerSet
    services: tuple[ResolvedService, ...]
    rule_id: str
    instance: int  # index of the rule instance (stable within one policy version)
    local: AddressSet | None = None  # None: any of the workload's addresses
    users: frozenset[str] | None = None  # outbound only: restrict to these users


@dataclass(frozen=True)
class CompiledWorkload:
    workload: str
    addresses: tuple[str, ...]
    enforcement: str
    os: str
    outbound_mode: str  # enforce | allow
    inbound: tuple[CompiledRule, ...] = ()
    outbound: tuple[CompiledRule, ...] = ()


@dataclass
class ServiceGroup:
    """Services of one rule rendered together: they share the extra (cgroup) match and the
    comment lines above them."""

    specs: list[PortSpec]
    extra: str = ""
    notes: list[str] = field(default_factory=list)


Binding = tuple[str | None, str | None]  # (process, unit)


def group_services(rule: CompiledRule, *, inbound: bool
                   ) -> tuple[list[PortSpec], list[tuple[Binding, list[PortSpec]]]]:
    """A rule's port specs split into the unbound ones and, per process/unit binding (in a
    stable order), the bound ones. Bindings count inbound only: the consumer's host cannot
    see the remote process, so outbound every service is plain."""
    plain: list[PortSpec] = []
    bound: dict[Binding, list[PortSpec]] = {}
    for svc in rule.services:
        if inbound and (svc.process is not None or svc.unit is not None):
            bound.setdefault((svc.process, svc.unit), []).append(svc.spec)
        else:
            plain.append(svc.spec)
    order = sorted(bound.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or ""))
    return plain, order


@dataclass(frozen=True)
class Endpoint:
    """An address (and optional TCP port) whose traffic is essential, e.g. the control plane."""

    address: str
    port: int | None = None


@dataclass(frozen=True)
class HostContext:
    """Facts about the host, supplied by the agent (or the test) at render time."""

    control_plane: tuple[Endpoint, ...] = ()
    # process name or unit name -> cgroup v2 path as nftables expects it, and its level
    cgroups: dict[str, tuple[str, int]] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)  # user name -> uid
    nflog_group: int = 7
    table: str = "bulkhead"
