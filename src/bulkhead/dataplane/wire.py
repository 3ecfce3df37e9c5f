"""The compiled policy on the wire: `CompiledWorkload` <-> plain JSON-able data.

Theory of operation: the control plane compiles, the agent renders (`render_nftables` /
`render_iptables` need host facts only the agent knows), so what travels is the compiled model
itself. `to_data` turns it into dicts, lists, strings and small integers (every value fits a
JSON number exactly: addresses travel as text, never as 128-bit integers); `from_data` checks
every field and rebuilds the frozen objects, so `from_data(to_data(cw)) == cw`.

Format (version `FORMAT`, in the `format` key; a reader refuses versions it does not know):

    {"format": 1, "workload": "web-1", "addresses": ["10.0.0.5"], "enforcement": "full",
     "os": "linux", "outbound_mode": "enforce",
     "inbound": [RULE, ...], "outbound": [RULE, ...]}
    RULE  = {"action": "allow", "rule_id": "web/0", "instance": 3,
             "peers": {"hosts": ADDRS, "nets": ADDRS},
             "services": [{"proto": 6, "lo": 443, "hi": 443, "process": null, "unit": null}],
             "local": ADDRS | null, "users": ["alice", ...] | null}
    ADDRS = ["10.0.0.0-10.255.255.255", "192.0.2.7", "2001:db8::-2001:db8::ff", ...]

Address sets are their normalised intervals (`AddressSet.describe`): a single address or
`first-last`, sorted, IPv4 first. Peer hosts travel the same way, as runs of consecutive
addresses (workload addresses come from subnets, so a 1,000-host peer set is typically a few
dozen runs), and are expanded back into single hosts on reading, at most `MAX_HOSTS` per rule.
`proto` null means any protocol; `lo`/`hi` null mean every port (or ICMP type) of it.

Errors: `from_data` raises `WireError` naming the path of the first bad field (for example
`inbound[2].services[0].lo`): bad input is the sender's fault, and an agent must apply nothing
it could not read whole. The module is pure (no I/O) and checked with `mypy --strict`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from bulkhead.dataplane.model import CompiledRule, CompiledWorkload, PeerSet
from bulkhead.domain.addresses import AddressSet, canonical_ip
from bulkhead.domain.model import ACTIONS, ENFORCEMENT_STATES
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.resolve import ResolvedService

FORMAT = 1
MAX_HOSTS = 1 << 20  # peer hosts of one rule, once expanded
OS_NAMES = ("linux", "windows")
OUTBOUND_MODES = ("enforce", "allow")


class WireError(ValueError):
    """A compiled policy that cannot be read; `path` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '<root>'}: {message}")
        self.path = path
        self.message = message


# -- encoding ---------------------------------------------------------------------------------
PeersEncoder = Callable[[PeerSet], Any]


def to_data(cw: CompiledWorkload, peers: PeersEncoder | None = None) -> dict[str, Any]:
    """`peers` may replace `peers_to_data` by anything its JSON encoder writes the same way
    (the server passes a cache of pre-encoded peer sets: the compiler shares one `PeerSet`
    object between every workload that uses a rule instance)."""
    enc = peers or peers_to_data
    return {
        "format": FORMAT,
        "workload": cw.workload,
        "addresses": list(cw.addresses),
        "enforcement": cw.enforcement,
        "os": cw.os,
        "outbound_mode": cw.outbound_mode,
        "inbound": [rule_to_data(r, enc) for r in cw.inbound],
        "outbound": [rule_to_data(r, enc) for r in cw.outbound],
    }


def rule_to_data(rule: CompiledRule, peers: PeersEncoder | None = None) -> dict[str, Any]:
    return {
        "action": rule.action,
        "rule_id": rule.rule_id,
        "instance": rule.instance,
        "peers": (peers or peers_to_data)(rule.peers),
        "services": [service_to_data(s) for s in rule.services],
        "local": None if rule.local is None else rule.local.describe(),
        "users": None if rule.users is None else sorted(rule.users),
    }


def peers_to_data(peers: PeerSet) -> dict[str, Any]:
    return {"hosts": AddressSet.of_ips(peers.hosts).describe(), "nets": peers.nets.describe()}


def service_to_data(s: ResolvedService) -> dict[str, Any]:
    return {"proto": s.spec.proto, "lo": s.spec.lo, "hi": s.spec.hi, "process": s.process,
            "unit": s.unit}


# -- decoding ---------------------------------------------------------------------------------
def from_data(data: object) -> CompiledWorkload:
    d = _mapping(data, "")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise WireError("format", f"unsupported format {fmt!r} (this reader knows {FORMAT})")
    return CompiledWorkload(
        workload=_str(d, "workload", ""),
        addresses=tuple(_ip(a, f"addresses[{i}]")
                        for i, a in enumerate(_list(d.get("addresses"), "addresses"))),
        enforcement=_choice(d, "enforcement", "", ENFORCEMENT_STATES),
        os=_choice(d, "os", "", OS_NAMES),
        outbound_mode=_choice(d, "outbound_mode", "", OUTBOUND_MODES),
        inbound=_rules(d.get("inbound"), "inbound"),
        outbound=_rules(d.get("outbound"), "outbound"),
    )


def rule_from_data(data: object, path: str) -> CompiledRule:
    d = _mapping(data, path)
    peers = _mapping(d.get("peers"), f"{path}.peers")
    hosts = _hosts(_addresses(peers.get("hosts"), f"{path}.peers.hosts"), f"{path}.peers.hosts")
    local = d.get("local")
    users = d.get("users")
    return CompiledRule(
        action=_choice(d, "action", path, ACTIONS),
        peers=PeerSet(hosts, _addresses(peers.get("nets"), f"{path}.peers.nets")),
        services=tuple(service_from_data(s, f"{path}.services[{i}]")
                       for i, s in enumerate(_list(d.get("services"), f"{path}.services"))),
        rule_id=_str(d, "rule_id", path),
        instance=_int(d.get("instance"), f"{path}.instance", 0, 2**31 - 1),
        local=None if local is None else _addresses(local, f"{path}.local"),
        users=None if users is None else frozenset(
            _text(u, f"{path}.users[{i}]") for i, u in enumerate(_list(users, f"{path}.users"))),
    )


def service_from_data(data: object, path: str) -> ResolvedService:
    d = _mapping(data, path)
    proto = _opt_int(d.get("proto"), f"{path}.proto", 0, 255)
    lo = _opt_int(d.get("lo"), f"{path}.lo", 0, 65535)
    hi = _opt_int(d.get("hi"), f"{path}.hi", 0, 65535)
    if (lo is None) != (hi is None):
        raise WireError(f"{path}.hi", "lo and hi must both be set or both be null")
    if lo is not None and (proto is None or hi is None or lo > hi):
        raise WireError(f"{path}.lo", "a port range needs a protocol and lo <= hi")
    process = d.get("process")
    unit = d.get("unit")
    return ResolvedService(
        PortSpec(proto, lo, hi),
        None if process is None else _text(process, f"{path}.process"),
        None if unit is None else _text(unit, f"{path}.unit"),
    )


def _hosts(runs: AddressSet, path: str) -> frozenset[str]:
    if runs.size() > MAX_HOSTS:
        raise WireError(path, f"{runs.size()} hosts, more than {MAX_HOSTS}")
    out: list[str] = []
    for version, intervals in ((4, runs.v4), (6, runs.v6)):
        mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for lo, hi in intervals:
            out.extend(str(mk(i)) for i in range(lo, hi + 1))
    return frozenset(out)


def _rules(data: object, path: str) -> tuple[CompiledRule, ...]:
    return tuple(rule_from_data(r, f"{path}[{i}]") for i, r in enumerate(_list(data, path)))


def _addresses(data: object, path: str) -> AddressSet:
    blocks = [_text(item, f"{path}[{i}]") for i, item in enumerate(_list(data, path))]
    try:
        return AddressSet.from_blocks(blocks)
    except ValueError as exc:
        raise WireError(path, str(exc)) from None


def _mapping(data: object, path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WireError(path, f"expected an object, got {type(data).__name__}")
    return data


def _list(data: object, path: str) -> list[object]:
    if not isinstance(data, list):
        raise WireError(path, f"expected a list, got {type(data).__name__}")
    return data


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise WireError(path, f"expected a non-empty string, got {value!r}")
    return value


def _str(d: dict[str, Any], key: str, path: str) -> str:
    return _text(d.get(key), f"{path}.{key}" if path else key)


def _choice(d: dict[str, Any], key: str, path: str, allowed: tuple[str, ...]) -> str:
    value = _str(d, key, path)
    if value not in allowed:
        raise WireError(f"{path}.{key}" if path else key,
                        f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _ip(value: object, path: str) -> str:
    text = _text(value, path)
    try:
        return canonical_ip(text)
    except ValueError as exc:
        raise WireError(path, str(exc)) from None


def _int(value: object, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(path, f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _opt_int(value: object, path: str, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, path, lo, hi)
