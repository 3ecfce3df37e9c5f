"""nftables renderer: one workload's compiled policy as one atomic `nft -f -` transaction.

Theory of operation
-------------------
`render_nftables(cw, ctx)` is a pure function from a `CompiledWorkload` and the agent's
`HostContext` to the text of an `nft -f -` script. The script is one transaction:
`add table inet T` (a no-op when T exists), `delete table inet T` (drops the old chains and
sets), then the complete new `table inet T { ... }`. The kernel applies all of it or none of
it, so a host never runs half a policy and never runs without one during the swap.

The table holds named peer sets and two base chains, `input` and `output` (priority filter,
policy accept; our own last rule decides). Each chain is laid out in a fixed order:

1. essential traffic, never blocked: loopback, `ct state established,related`, the control
   plane, DHCP, ICMP errors, ICMPv6 neighbour discovery and MLD;
2. `override_deny` rules, 3. `allow` rules, 4. `deny` rules, 5. the default.

First match wins, so the chain order realises the order-free precedence of the evaluator
(override_deny > allow > deny > no rule); a flow matched by an allow and a deny rule hits the
allow first (allowed_across_boundary). The enforcement state only changes verdicts:
`full` drops at deny rules and at the default, `selective` drops at deny rules only,
`visibility` drops nothing, and every non-allow verdict logs to NFLOG with the prefix
`bh:<o|d|n>:<instance>`. `idle` renders a script that only removes the table.

Inbound rules match the peer in `ip/ip6 saddr`, outbound rules in `daddr`. Peers are named
sets: single addresses in hash sets (cheap to update one by one), networks in interval sets,
one set per distinct content, named `p<N>_<h|n><4|6>` in order of first use. A rule becomes
one nft rule per (peer set x protocol group). Process- and unit-bound services add
`socket cgroupv2` inbound (remote processes are invisible, so outbound matches the port only);
user-bound outbound rules add `meta skuid`. Where the host context lacks a fact the renderer
fails closed: an allow is left out, a deny is widened to the port (see docs/design/nftables.md).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bulkhead.dataplane.model import (
    CompiledRule,
    CompiledWorkload,
    HostContext,
    PeerSet,
    ServiceGroup,
    family_hosts,
    group_services,
)
from bulkhead.domain.addresses import AddressSet
from bulkhead.domain.ports import ICMP_PROTOS, PORTED, PortSpec

__all__ = ["remove_nftables", "render_nftables"]

ENFORCEMENT = ("idle", "visibility", "selective", "full")
TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
COMMENT_MAX = 128  # nft rejects longer rule comments
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@/+\-=,()' ]")
_CGROUP_PATH_RE = re.compile(r"^[A-Za-z0-9_.:@+\-/]{1,4000}$")
_KEYWORD_PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
_PORT_PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
_ACTION_LOG = {"override_deny": "o", "deny": "d"}
_SECTION = {"override_deny": "override_deny rules (beat every allow)",
            "allow": "allow rules",
            "deny": "deny rules (an allow above wins: allowed across the boundary)"}
_ELEMENTS_WIDTH = 92  # wrap set elements at about this many characters per line

ICMP_ERRORS = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMPV6_ERRORS = ("destination-unreachable", "packet-too-big", "time-exceeded",
                 "parameter-problem")
ICMPV6_ND_MLD = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit",
                 "nd-neighbor-advert", "nd-redirect", "mld-listener-query",
                 "mld-listener-report", "mld-listener-done", "mld2-listener-report")


@dataclass(frozen=True)
class _Family:
    version: int
    nf: str  # ip | ip6: the payload keyword
    set_type: str
    af: socket.AddressFamily
    width: int  # address bytes
    icmp: int  # the ICMP protocol of this family


V4 = _Family(4, "ip", "ipv4_addr", socket.AF_INET, 4, 1)
V6 = _Family(6, "ip6", "ipv6_addr", socket.AF_INET6, 16, 58)
FAMILIES = (V4, V6)


# -- public API -------------------------------------------------------------------------------

def remove_nftables(ctx: HostContext) -> str:
    """A script that removes our table; safe when the table is absent."""
    table = _table_name(ctx)
    return (f"# Bulkhead: remove table inet {table} (safe when absent)\n"
            f"add table inet {table}\ndelete table inet {table}\n")


def render_nftables(cw: CompiledWorkload, ctx: HostContext) -> str:
    """The complete `nft -f -` script enforcing `cw` on its host, as one transaction."""
    table = _table_name(ctx)
    if cw.enforcement not in ENFORCEMENT:
        raise ValueError(f"unknown enforcement state {cw.enforcement!r}")
    if cw.outbound_mode not in ("enforce", "allow"):
        raise ValueError(f"unknown outbound mode {cw.outbound_mode!r}")
    if cw.os != "linux":
        raise ValueError(f"workload {cw.workload!r} runs {cw.os}: nftables is for linux")
    if not 0 <= ctx.nflog_group <= 65535:
        raise ValueError(f"NFLOG group {ctx.nflog_group} out of range 0-65535")
    head = [f"# Bulkhead nftables ruleset for workload {_text(cw.workload)}",
            f"# enforcement: {cw.enforcement}; outbound: {cw.outbound_mode}; "
            f"addresses: {_text(' '.join(cw.addresses)) or '-'}",
            "# One transaction: the old table is replaced atomically. Generated; do not edit."]
    if cw.enforcement == "idle":
        head.append("# idle: no firewall is programmed; only remove our table")
        return "\n".join([*head, f"add table inet {table}", f"delete table inet {table}"]) + "\n"
    r = _Renderer(cw, ctx)
    chains = [r.chain("input", inbound=True)]
    if cw.outbound_mode == "enforce":
        chains.append(r.chain("output", inbound=False))
    body = [f"add table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    for s in r.sets.defs:
        body.extend(s.render())
    if cw.outbound_mode == "allow":
        body.append("\t# settings.outbound is allow: no output chain, outbound is not filtered")
    for lines in chains:
        body.extend(lines)
    body.append("}")
    return "\n".join(head + body) + "\n"


# -- peer sets ----------------------------------------------------------------------------------

@dataclass
class _SetDef:
    name: str
    family: _Family
    interval: bool
    elements: tuple[str, ...]

    def render(self) -> list[str]:
        out = [f"\tset {self.name} {{", f"\t\ttype {self.family.set_type}"]
        if self.interval:
            out.append("\t\tflags interval")
        out.extend(_wrap_elements(self.elements))
        out.append("\t}")
        return out


@dataclass(frozen=True)
class _Part:
    """One family/kind part of a peer set: `kind` is `h` (hosts) or `n` (networks)."""

    family: _Family
    kind: str
    elements: tuple[str, ...]


@dataclass
class _Sets:
    """Named sets in order of first use; identical contents share one set."""

    defs: list[_SetDef] = field(default_factory=list)
    by_content: dict[tuple[int, str, tuple[str, ...]], str] = field(default_factory=dict)
    peer_index: dict[PeerSet, int] = field(default_factory=dict)
    parts_cache: dict[PeerSet, list[_Part]] = field(default_factory=dict)

    def parts(self, peers: PeerSet) -> list[_Part]:
        got = self.parts_cache.get(peers)
        if got is None:
            got = []
            for fam in FAMILIES:
                hosts = _hosts(peers.hosts, fam)
                if hosts:
                    got.append(_Part(fam, "h", hosts))
                nets = _intervals(peers.nets, fam)
                if nets:
                    got.append(_Part(fam, "n", nets))
            self.parts_cache[peers] = got
        return got

    def name(self, peers: PeerSet, part: _Part) -> str:
        key = (part.family.version, part.kind, part.elements)
        name = self.by_content.get(key)
        if name is None:
            idx = self.peer_index.setdefault(peers, len(self.peer_index))
            name = f"p{idx}_{part.kind}{part.family.version}"
            self.by_content[key] = name
            self.defs.append(_SetDef(name, part.family, part.kind == "n", part.elements))
        return name


def _hosts(hosts: Iterable[str], fam: _Family) -> tuple[str, ...]:
    return family_hosts(hosts, fam.version)


def _ip_text(fam: _Family, value: int) -> str:
    return socket.inet_ntop(fam.af, value.to_bytes(fam.width, "big"))


def _intervals(addrs: AddressSet, fam: _Family) -> tuple[str, ...]:
    """Disjoint intervals as an address, a CIDR when exactly one, else `first-last`."""
    bits = fam.width * 8
    out: list[str] = []
    for lo, hi in addrs.v4 if fam.version == 4 else addrs.v6:
        size = hi - lo + 1
        if lo == hi:
            out.append(_ip_text(fam, lo))
        elif size & (size - 1) == 0 and lo % size == 0:
            out.append(f"{_ip_text(fam, lo)}/{bits - size.bit_length() + 1}")
        else:
            out.append(f"{_ip_text(fam, lo)}-{_ip_text(fam, hi)}")
    return tuple(out)


def _wrap_elements(elements: Sequence[str]) -> list[str]:
    lines: list[str] = []
    cur: list[str] = []
    width = 0
    for e in elements:
        if cur and width + len(e) + 2 > _ELEMENTS_WIDTH:
            lines.append(", ".join(cur))
            cur, width = [], 0
        cur.append(e)
        width += len(e) + 2
    if cur:
        lines.append(", ".join(cur))
    if len(lines) == 1:
        return [f"\t\telements = {{ {lines[0]} }}"]
    out = [f"\t\telements = {{ {lines[0]},"]
    out.extend(f"\t\t\t     {ln}," for ln in lines[1:-1])
    out.append(f"\t\t\t     {lines[-1]} }}")
    return out


# -- services -----------------------------------------------------------------------------------

def _braces(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _port_ranges(specs: Iterable[PortSpec]) -> tuple[str, ...]:
    merged: list[list[int]] = []
    for lo, hi in sorted((s.lo, s.hi) for s in specs if s.lo is not None and s.hi is not None):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple(str(a) if a == b else f"{a}-{b}" for a, b in merged)


def _service_matches(specs: Sequence[PortSpec], fam: _Family) -> list[str]:
    """The protocol groups of `specs` for one family: one match text each ("" = everything).

    Protocols with identical port lists share one `meta l4proto { .. } th dport { .. }`;
    ICMP types only apply to their own family; whole protocols share one `meta l4proto`."""
    if any(s.proto is None for s in specs):
        return [""]
    whole: set[int] = set()
    ported: dict[int, list[PortSpec]] = {}
    icmp_types: set[int] = set()
    for s in specs:
        assert s.proto is not None
        if s.proto in ICMP_PROTOS and s.proto != fam.icmp:
            continue  # ICMP of the other family: never matches this family's rules
        if s.lo is None:
            whole.add(s.proto)
        elif s.proto in PORTED:
            ported.setdefault(s.proto, []).append(s)
        else:
            icmp_types.add(s.lo)
    out: list[str] = []
    by_ports: dict[tuple[str, ...], list[int]] = {}
    for proto in sorted(p for p in ported if p not in whole):
        by_ports.setdefault(_port_ranges(ported[proto]), []).append(proto)
    for ports, protos in by_ports.items():
        if len(protos) == 1:
            out.append(f"{_PORT_PROTOS[protos[0]]} dport {_braces(ports)}")
        else:
            names = [_PORT_PROTOS[p] for p in protos]
            out.append(f"meta l4proto {_braces(names)} th dport {_braces(ports)}")
    if icmp_types and fam.icmp not in whole:
        kw = "icmp" if fam.version == 4 else "icmpv6"
        out.append(f"{kw} type {_braces([str(t) for t in sorted(icmp_types)])}")
    if whole:
        names = [_KEYWORD_PROTOS.get(p, str(p)) for p in sorted(whole)]
        out.append(f"meta l4proto {_braces(names)}")
    return out


# -- rules --------------------------------------------------------------------------------------

def _text(s: str) -> str:
    """Text made safe for a `#` comment line or a quoted nft string."""
    return _UNSAFE.sub("_", s)


def _comment(s: str) -> str:
    return f'comment "{_text(s)[:COMMENT_MAX]}"'


def _table_name(ctx: HostContext) -> str:
    if not TABLE_RE.match(ctx.table):
        raise ValueError(f"table name {ctx.table!r} is not a plain identifier")
    return ctx.table


def _local_match(local: AddressSet, fam: _Family, key: str) -> str | None:
    """`ip daddr { .. }` for the workload's own addresses of one family, None when none."""
    elements = _intervals(local, fam)
    if not elements:
        return None
    return f"{fam.nf} {key} {_braces(elements)}"


class _Renderer:
    def __init__(self, cw: CompiledWorkload, ctx: HostContext) -> None:
        self.cw = cw
        self.ctx = ctx
        self.sets = _Sets()
        self.drop_rules = cw.enforcement in ("full", "selective")
        self.drop_default = cw.enforcement == "full"

    # essential traffic first, never blocked
    def essential(self, inbound: bool) -> list[str]:
        key, port_kw = ("saddr", "sport") if inbound else ("daddr", "dport")
        lines = [f'{"iif" if inbound else "oif"} "lo" counter accept '
                 f'{_comment("essential: loopback")}',
                 f'ct state established,related counter accept '
                 f'{_comment("essential: established/related")}']
        for ep in self.ctx.control_plane:
            try:
                addr = ipaddress.ip_address(ep.address)
            except ValueError:
                raise ValueError(f"control-plane address {ep.address!r} is not an IP") from None
            if ep.port is not None and not 1 <= ep.port <= 65535:
                raise ValueError(f"control-plane port {ep.port} out of range 1-65535")
            nf = "ip" if addr.version == 4 else "ip6"
            l4 = "meta l4proto tcp" if ep.port is None else f"tcp {port_kw} {ep.port}"
            lines.append(f"{nf} {key} {addr} {l4} counter accept "
                         f'{_comment("essential: control plane")}')
        if inbound:
            lines.append('meta nfproto ipv4 udp sport 67 udp dport 68 counter accept '
                         f'{_comment("essential: DHCPv4")}')
            lines.append('meta nfproto ipv6 udp dport 546 counter accept '
                         f'{_comment("essential: DHCPv6")}')
        else:
            lines.append('meta nfproto ipv4 udp dport 67 counter accept '
                         f'{_comment("essential: DHCPv4")}')
            lines.append('meta nfproto ipv6 udp dport 547 counter accept '
                         f'{_comment("essential: DHCPv6")}')
        lines.append(f"icmp type {_braces(ICMP_ERRORS)} counter accept "
                     f'{_comment("essential: ICMP errors")}')
        lines.append(f"icmpv6 type {_braces(ICMPV6_ERRORS)} counter accept "
                     f'{_comment("essential: ICMPv6 errors")}')
        lines.append(f"icmpv6 type {_braces(ICMPV6_ND_MLD)} counter accept "
                     f'{_comment("essential: ICMPv6 neighbour discovery and MLD")}')
        return lines

    def chain(self, name: str, *, inbound: bool) -> list[str]:
        out = [f"\tchain {name} {{",
               f"\t\ttype filter hook {name} priority filter; policy accept;",
               "\t\t# essential traffic: never blocked"]
        out.extend("\t\t" + ln for ln in self.essential(inbound))
        rules = self.cw.inbound if inbound else self.cw.outbound
        for action in ("override_deny", "allow", "deny"):
            lines: list[str] = []
            for rule in rules:
                if rule.action == action:
                    lines.extend(self.rule(rule, inbound=inbound))
            if lines:
                out.append("")
                out.append(f"\t\t# {_SECTION[action]}")
                out.extend("\t\t" + ln for ln in lines)
        log = f'log prefix "bh:n:-" group {self.ctx.nflog_group}'
        verdict = "drop" if self.drop_default else "accept"
        out.append("")
        out.append(f"\t\t# default (no rule): {'drop' if self.drop_default else 'log only'}")
        out.append(f'\t\tcounter {log} {verdict} {_comment("default: no rule")}')
        out.append("\t}")
        return out

    def verdict(self, rule: CompiledRule) -> str:
        if rule.action == "allow":
            return "accept"
        if rule.action not in _ACTION_LOG:
            raise ValueError(f"rule {rule.rule_id!r}: unknown action {rule.action!r}")
        log = f'log prefix "bh:{_ACTION_LOG[rule.action]}:{int(rule.instance)}" ' \
              f"group {self.ctx.nflog_group}"
        return f"{log} {'drop' if self.drop_rules else 'accept'}"

    def groups(self, rule: CompiledRule, *, inbound: bool) -> list[ServiceGroup]:
        """The rule's services grouped by their process/unit binding (inbound only)."""
        plain, bound = group_services(rule, inbound=inbound)
        out = [ServiceGroup(plain)] if plain else []
        out += [self.bound_group(rule, process, unit, specs)
                for (process, unit), specs in bound]
        return out

    def bound_group(self, rule: CompiledRule, process: str | None, unit: str | None,
                    specs: list[PortSpec]) -> ServiceGroup:
        matches: list[str] = []
        missing: list[str] = []
        for kind, name in (("process", process), ("unit", unit)):
            if name is None:
                continue
            got = self.ctx.cgroups.get(name)
            if got is None or not _CGROUP_PATH_RE.match(got[0]) or not (
                    isinstance(got[1], int) and 0 <= got[1] <= 255):
                missing.append(f"{kind} {_text(name)!r}")
            else:
                matches.append(f'socket cgroupv2 level {got[1]} "{got[0]}"')
        ports = ", ".join(str(s) for s in specs)
        if not missing:
            return ServiceGroup(specs, " ".join(matches))
        why = f"{_text(rule.rule_id)}: no usable cgroup for {' and '.join(missing)}"
        if rule.action == "allow":
            return ServiceGroup([], notes=[f"# {why}: {ports} not allowed (fail closed)"])
        return ServiceGroup(specs, notes=[f"# {why}: {ports} {rule.action} widened to every "
                                    "process (fail closed)"])

    def rule(self, rule: CompiledRule, *, inbound: bool) -> list[str]:
        """The nft rules (and explanatory comments) for one compiled rule."""
        peer_key, local_key = ("saddr", "daddr") if inbound else ("daddr", "saddr")
        if not rule.peers:
            return []
        tail = f"counter {self.verdict(rule)} {_comment(rule.rule_id)}"
        users = ""
        if not inbound and rule.users is not None:
            uids = sorted({uid for u, uid in self.ctx.uids.items() if u in rule.users
                           and isinstance(uid, int) and 0 <= uid < 2**32})
            if not uids:
                return [f"# {_text(rule.rule_id)}: none of its users has a uid on this host"]
            users = f"meta skuid {_braces([str(u) for u in uids])}"
        out: list[str] = []
        for group in self.groups(rule, inbound=inbound):
            out.extend(group.notes)
            if not group.specs:
                continue
            for part in self.sets.parts(rule.peers):
                local = ""
                if rule.local is not None:
                    lm = _local_match(rule.local, part.family, local_key)
                    if lm is None:
                        continue
                    local = lm
                services = _service_matches(group.specs, part.family)
                if not services:
                    continue
                peer = f"{part.family.nf} {peer_key} @{self.sets.name(rule.peers, part)}"
                for svc in services:
                    words = [peer, local, svc, users, group.extra, tail]
                    out.append(" ".join(w for w in words if w))
        return out

