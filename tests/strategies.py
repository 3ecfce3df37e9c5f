"""Hypothesis strategies shared by the test suite.

- `policy_data()`: plain data (the policy file's structure) for a small but feature-complete
  policy: declared label keys (sometimes a custom one), label groups (nested), workloads with
  unique IPv4/IPv6 addresses (managed or not, all enforcement states, both OSes), IP lists with
  CIDRs, ranges and exclusions, services (ports, ranges, ICMP/ICMPv6 types, protocols, `any`,
  some bound to a process or a unit), user groups, rulesets with 0-2 scopes (some disabled),
  rules of every action with every actor kind, `extra_scope`, explicit and default ids, and
  `settings.outbound` in both modes. Every reference points at an object that exists, so the
  data is always valid.
- `policies()`: the same, loaded through `policy_from_data` (a load error is a real failure:
  nothing is filtered or assumed away). At least one workload unless `min_workloads=0`.
- `flows_for(policy)`: a strategy of `Flow`s aimed at the policy. About half are aimed at one
  rule instance (its consumer and provider addresses and its services, each missed on purpose
  now and then); the others mix workload addresses (on request also non-canonical IPv6
  spellings), addresses at and around every IP-list block and exclusion, external addresses,
  ports inside, at the edges of and outside every service spec, and other protocols; each
  with or without a process, unit and user.

Addresses live in small spaces (10.0.0.0/26, 192.0.2.0/28, fd00::/120) so that workloads, IP
lists and exclusions overlap often.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from hypothesis import strategies as st

from bulkhead.domain.addresses import parse_block
from bulkhead.domain.model import Policy
from bulkhead.domain.ports import PortSpec
from bulkhead.policy.evaluate import Flow
from bulkhead.policy.fileformat import policy_from_data
from bulkhead.policy.resolve import Side, resolve

DEFAULT_KEYS = ["role", "app", "env", "loc"]
VALUES: dict[str, list[str]] = {
    "role": ["web", "api", "db"],
    "app": ["shop", "pay", "crm"],
    "env": ["prod", "staging", "dev"],
    "loc": ["eu", "us"],
    "team": ["red", "blue"],
}
PORT_SPECS = ["tcp/80", "tcp/443", "tcp/8000-8099", "tcp/1-1024", "udp/53", "udp/1000-2000",
              "tcp", "udp", "icmp", "icmp/8", "icmp/0", "icmpv6", "icmpv6/128", "any", "gre",
              "proto/132", "sctp/9", "tcp/65535"]
PROCESSES = ["mysqld", "nginx", "sqlservr.exe"]
UNITS = ["mysql.service", "nginx.service"]
USERS = ["alice", "bob", "carol", "dave"]
BLOCKS = ["10.0.0.0/28", "10.0.0.16/29", "10.0.0.0/26", "10.0.0.5-10.0.0.20", "10.0.0.7",
          "0.0.0.0/0", "192.0.2.0/28", "192.0.2.8/30", "::/0", "fd00::/120", "fd00::10-fd00::1f",
          "fd00::3", "2001:db8::/126", "10.0.0.0/8"]
EXTERNAL = ["198.51.100.7", "203.0.113.200", "192.0.2.100", "10.1.2.3", "2001:db8:ffff::1",
            "fe80::1", "0.0.0.0", "255.255.255.255", "::1"]
PROTOS = [6, 17, 1, 58, 47, 132, 0, 50]


def _v4(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + i))  # 10.0.0.i


def _v6(i: int) -> str:
    return str(ipaddress.IPv6Address(0xFD00 << 112 | i))  # fd00::i


@st.composite
def _selector(draw: st.DrawFn, keys: list[str], groups: dict[str, list[str]],
              max_keys: int = 2) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(keys), max_size=max_keys, unique=True))
    out: dict[str, Any] = {}
    for k in chosen:
        values = [*VALUES[k], "other"]
        options: list[st.SearchStrategy[Any]] = [
            st.sampled_from(values),
            st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True),
        ]
        if groups.get(k):
            options.append(st.sampled_from(groups[k]).map(lambda g: {"group": g}))
        out[k] = draw(st.one_of(options))
    return out


@st.composite
def policy_data(draw: st.DrawFn, max_workloads: int = 8, max_rulesets: int = 3,
                max_rules: int = 4, min_workloads: int = 1) -> dict[str, Any]:
    """Plain data of a valid policy (see the module docstring)."""
    keys = list(DEFAULT_KEYS)
    data: dict[str, Any] = {"version": 1}
    if draw(st.booleans()):
        keys = [*DEFAULT_KEYS, "team"]
        data["label_keys"] = keys

    # label groups: per key up to two, the second may include the first (nesting)
    groups: dict[str, list[str]] = {}
    label_groups: list[dict[str, Any]] = []
    for k in draw(st.lists(st.sampled_from(["env", "role", "app"]), max_size=2, unique=True)):
        first = f"{k}-g0"
        label_groups.append({"name": first, "key": k, "values": draw(
            st.lists(st.sampled_from(VALUES[k]), max_size=2, unique=True))})
        groups[k] = [first]
        if draw(st.booleans()):
            second = f"{k}-g1"
            label_groups.append({"name": second, "key": k, "groups": [first], "values": draw(
                st.lists(st.sampled_from(VALUES[k]), max_size=1, unique=True))})
            groups[k].append(second)
    if label_groups:
        data["label_groups"] = label_groups

    ip_lists = []
    for i in range(draw(st.integers(0, 3))):
        item: dict[str, Any] = {"name": f"list{i}", "cidrs": draw(
            st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3, unique=True))}
        exclude = draw(st.lists(st.sampled_from(BLOCKS), max_size=2, unique=True))
        if exclude:
            item["exclude"] = exclude
        ip_lists.append(item)
    if ip_lists:
        data["ip_lists"] = ip_lists

    services = []
    for i in range(draw(st.integers(0, 4))):
        svc: dict[str, Any] = {"name": f"svc{i}", "ports": draw(
            st.lists(st.sampled_from(PORT_SPECS), min_size=1, max_size=3, unique=True))}
        binding = draw(st.sampled_from(["none", "none", "process", "unit"]))
        if binding == "process":
            svc["process"] = draw(st.sampled_from(PROCESSES))
        elif binding == "unit":
            svc["unit"] = draw(st.sampled_from(UNITS))
        services.append(svc)
    if services:
        data["services"] = services

    user_groups = []
    for i in range(draw(st.integers(0, 2))):
        user_groups.append({"name": f"users{i}", "members": draw(
            st.lists(st.sampled_from(USERS), max_size=3, unique=True))})
    if user_groups:
        data["user_groups"] = user_groups

    n_w = draw(st.integers(min_workloads, max_workloads))
    v4 = draw(st.lists(st.integers(0, 63), min_size=n_w, max_size=n_w, unique=True))
    v6 = draw(st.lists(st.integers(0, 40), min_size=n_w, max_size=n_w, unique=True))
    workloads = []
    for i in range(n_w):
        family = draw(st.sampled_from(["v4", "v4", "v4", "v4", "both", "both", "v6", "none"]))
        ips = ([_v4(v4[i])] if family in ("v4", "both") else []) + (
            [_v6(v6[i])] if family in ("v6", "both") else [])
        w: dict[str, Any] = {"name": f"w{i}", "ips": ips}
        labels = {k: draw(st.sampled_from(VALUES[k]))
                  for k in draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True))}
        if labels:
            w["labels"] = labels
        if draw(st.integers(0, 3)) > 0:
            w["managed"] = True
        w["enforcement"] = draw(st.sampled_from(["idle", "visibility", "selective", "full"]))
        if draw(st.integers(0, 4)) == 0:
            w["os"] = "windows"
        workloads.append(w)
    if workloads:
        data["workloads"] = workloads

    def actor(consumer: bool) -> st.SearchStrategy[dict[str, Any]]:
        options: list[st.SearchStrategy[dict[str, Any]]] = [
            _selector(keys, groups).map(lambda s: {"labels": s}),
            st.just({"all_workloads": True}),
        ]
        if workloads:
            options.append(st.sampled_from([w["name"] for w in workloads]).map(
                lambda n: {"workload": n}))
        if ip_lists:
            options.append(st.sampled_from([x["name"] for x in ip_lists]).map(
                lambda n: {"ip_list": n}))
        if consumer and user_groups:
            options.append(st.sampled_from([u["name"] for u in user_groups]).map(
                lambda n: {"user_group": n}))
        return st.one_of(options)

    service_refs = PORT_SPECS + [s["name"] for s in services]
    rulesets = []
    for i in range(draw(st.integers(0, max_rulesets))):
        rs: dict[str, Any] = {"name": f"rs{i}"}
        scopes = draw(st.lists(_selector(keys, groups), max_size=2))
        if scopes:
            rs["scopes"] = scopes
        if draw(st.integers(0, 7)) == 0:
            rs["enabled"] = False
        rules = []
        for j in range(draw(st.integers(0, max_rules))):
            rule: dict[str, Any] = {
                "action": draw(st.sampled_from(["allow", "allow", "deny", "override_deny"])),
                "consumers": draw(st.lists(actor(True), min_size=1, max_size=2)),
                "providers": draw(st.lists(actor(False), min_size=1, max_size=2)),
                "services": draw(st.lists(st.sampled_from(service_refs), min_size=1,
                                          max_size=2, unique=True)),
            }
            if draw(st.booleans()):
                rule["id"] = f"r{i}-{j}"
            if draw(st.integers(0, 3)) == 0:
                rule["extra_scope"] = True
            rules.append(rule)
        rs["rules"] = rules
        rulesets.append(rs)
    if rulesets:
        data["rulesets"] = rulesets
    outbound = draw(st.sampled_from([None, "enforce", "allow"]))
    if outbound is not None:
        data["settings"] = {"outbound": outbound}
    return data


def policies(max_workloads: int = 8, max_rulesets: int = 3, max_rules: int = 4,
             min_workloads: int = 1) -> st.SearchStrategy[Policy]:
    """Valid `Policy` objects, built through `policy_from_data`."""
    return policy_data(max_workloads, max_rulesets, max_rules, min_workloads).map(
        policy_from_data)


def _block_addresses(block: str) -> list[str]:
    """Addresses at, inside and just outside one CIDR or range."""
    family, lo, hi = parse_block(block)
    top = 2**32 - 1 if family == 4 else 2**128 - 1
    mk = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    values = {lo, hi, (lo + hi) // 2, max(lo - 1, 0), min(hi + 1, top)}
    return [str(mk(v)) for v in sorted(values)]


def _spellings(ip: str) -> list[str]:
    """An address and other spellings of it that parse to the same address."""
    a = ipaddress.ip_address(ip)
    if a.version == 6:
        return [ip, a.exploded, a.exploded.upper(), ip.upper()]
    return [ip]


def _ports_for(spec: PortSpec) -> list[tuple[int, int | None]]:
    """(proto, port) pairs that match `spec` or miss it narrowly."""
    if spec.proto is None:
        return [(6, 443), (17, 53), (1, None), (47, None)]
    if spec.lo is None or spec.hi is None:
        return [(spec.proto, None), (spec.proto, 7), (spec.proto, 65535)]
    limit = 255 if spec.proto in (1, 58) else 65535
    out: list[tuple[int, int | None]] = [(spec.proto, spec.lo), (spec.proto, spec.hi),
                                         (spec.proto, None), ((spec.proto + 11) % 256, spec.lo)]
    if spec.lo > 0:
        out.append((spec.proto, spec.lo - 1))
    if spec.hi < limit:
        out.append((spec.proto, spec.hi + 1))
    return out


@dataclass(frozen=True)
class _Targets:
    """Per policy: addresses and (proto, port) pairs worth aiming at."""

    workload_ips: tuple[str, ...]
    listed: tuple[str, ...]
    pairs: tuple[tuple[int, int | None], ...]
    processes: tuple[str, ...]
    units: tuple[str, ...]
    users: tuple[str, ...]
    # per rule instance: (consumer addresses, provider addresses, service pairs, users)
    aims: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int | None], ...],
                      tuple[str, ...]], ...]


def _addresses_of(side: Side, policy: Policy) -> list[str]:
    out = [ip for w in policy.workloads if side.matches_workload(w) for ip in w.ips]
    for first, last in side.addresses.describe_intervals():
        out += [first, last]
    return out


@lru_cache(maxsize=32)
def _targets(policy: Policy) -> _Targets:
    workload_ips = tuple(ip for w in policy.workloads for ip in w.ips)
    listed = tuple(sorted({a for x in policy.ip_lists for b in (*x.cidrs, *x.exclude)
                           for a in _block_addresses(b)}))
    names = {s.name for s in policy.services}
    specs = [PortSpec.parse(p) for s in policy.services for p in s.ports]
    specs += [PortSpec.parse(p) for rs in policy.rulesets for r in rs.rules for p in r.services
              if p not in names]
    pairs: list[tuple[int, int | None]] = [(6, 443), (6, 22), (17, 53), (1, 8), (58, 128)]
    for spec in specs:
        pairs.extend(_ports_for(spec))
    aims = []
    for inst in resolve(policy).instances:
        cons = _addresses_of(inst.consumers, policy)
        prov = _addresses_of(inst.providers, policy)
        if inst.consumers.users and not cons:
            cons = list(workload_ips) + list(EXTERNAL[:2])
        if cons and prov:
            svc_pairs = tuple(p for s in inst.services for p in _ports_for(s.spec))
            aims.append((tuple(cons), tuple(prov), svc_pairs,
                         tuple(sorted(inst.consumers.users))))
    return _Targets(
        workload_ips, listed, tuple(dict.fromkeys(pairs)),
        tuple(sorted({s.process for s in policy.services if s.process})),
        tuple(sorted({s.unit for s in policy.services if s.unit})),
        tuple(sorted({m for g in policy.user_groups for m in g.members})), tuple(aims))


def flows_for(policy: Policy, odd_spellings: bool = False) -> st.SearchStrategy[Flow]:
    """Flows aimed at `policy` (see the module docstring). About half the flows are aimed at
    one rule instance (its consumers, providers and services, each end also missed on purpose
    now and then). With `odd_spellings`, IPv6 workload addresses also appear in non-canonical
    forms (exploded, upper case)."""
    t = _targets(policy)
    options: list[st.SearchStrategy[str]] = [st.sampled_from(EXTERNAL)]
    if t.workload_ips:
        options += [st.sampled_from(t.workload_ips)] * 6
        if odd_spellings:
            options.append(st.sampled_from(t.workload_ips).flatmap(
                lambda ip: st.sampled_from(_spellings(ip))))
    if t.listed:
        options += [st.sampled_from(t.listed)] * 2
    address = st.one_of(options)
    pairs = st.sampled_from(t.pairs)
    proto_port = st.one_of(
        pairs, pairs, pairs,
        st.tuples(st.sampled_from(PROTOS), st.one_of(st.none(), st.integers(0, 65535))))
    users = [*USERS, *t.users, "nobody"]
    any_user = st.one_of(st.none(), st.sampled_from(users))
    process_names = [*PROCESSES, *t.processes]
    process = st.one_of(
        st.none(),
        st.sampled_from(process_names),
        st.sampled_from(process_names).map(lambda p: f"/usr/sbin/{p}"),
        st.sampled_from(process_names).map(lambda p: f"C:\\Program Files\\x\\{p}"),
    )
    unit = st.one_of(st.none(), st.sampled_from([*UNITS, *t.units]))

    @st.composite
    def aimed(draw: st.DrawFn) -> Flow:
        cons, prov, svc_pairs, aim_users = draw(st.sampled_from(t.aims))
        src = draw(st.sampled_from(cons)) if draw(st.integers(0, 5)) else draw(address)
        dst = draw(st.sampled_from(prov)) if draw(st.integers(0, 5)) else draw(address)
        on_service = draw(st.integers(0, 4)) > 0 if svc_pairs else False
        proto, port = draw(st.sampled_from(svc_pairs) if on_service else proto_port)
        user = draw(st.one_of(st.none(), st.sampled_from(aim_users or users),
                              st.sampled_from(users)))
        return Flow(src, dst, proto, port, draw(process), draw(unit), user)

    @st.composite
    def anywhere(draw: st.DrawFn) -> Flow:
        src, dst = draw(address), draw(address)
        proto, port = draw(proto_port)
        return Flow(src, dst, proto, port, draw(process), draw(unit), draw(any_user))

    return st.one_of(aimed(), anywhere()) if t.aims else anywhere()
