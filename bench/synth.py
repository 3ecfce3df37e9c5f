"""Deterministic synthetic policies and flows for benchmarks (and tests that need volume).

    make_policy(n_workloads, n_rules, seed=0) -> Policy
    make_flows(policy, n, seed=0) -> FlowColumns(src, dst, proto, port)

The policy looks like a real estate: apps x envs (prod, staging, dev) x roles (web, api, db,
cache, worker) labels plus a location, ~10% unmanaged workloads, enforcement states mixed,
every workload an IPv4 address (each app+env in its own block of 10.0.0.0/8) and ~5% an IPv6
one as well. Rulesets are scoped per app+env and hold tier rules (internet -> web, web -> api,
api -> db/cache, worker -> db/queue, admins -> ssh, a cross-app rule with extra_scope); a few
global rulesets hold deny and override_deny fences. A handful of services are bound to a
process or a systemd unit. Exactly `n_rules` rules are produced. The policy is built through
`policy_from_data`, so it is always valid.

Flows mix intra-app traffic on the app's tier ports (~60%), cross-app traffic (~20%), inbound
from external addresses (~12%) and outbound to external addresses (~8%); ports are the tier
ports, well-known ones and random high ports; protocols are TCP, UDP and ICMP.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from bulkhead.domain.model import Policy
from bulkhead.policy.fileformat import policy_from_data

ENVS = ("prod", "staging", "dev")
ROLES = ("web", "api", "db", "cache", "worker")
ROLE_WEIGHTS = (0.3, 0.3, 0.15, 0.1, 0.15)
LOCS = ("eu", "us", "ap")
ENFORCEMENT = (("full", 0.5), ("selective", 0.15), ("visibility", 0.25), ("idle", 0.1))
SERVICES: list[dict[str, Any]] = [
    {"name": "https", "ports": ["tcp/443"]},
    {"name": "http", "ports": ["tcp/80", "tcp/8000-8099"]},
    {"name": "api", "ports": ["tcp/8080-8089"]},
    {"name": "mysql", "ports": ["tcp/3306"], "process": "mysqld"},
    {"name": "postgres", "ports": ["tcp/5432"], "unit": "postgresql.service"},
    {"name": "redis", "ports": ["tcp/6379"]},
    {"name": "kafka", "ports": ["tcp/9092-9094"]},
    {"name": "jmx", "ports": ["tcp/9999"], "process": "java"},
    {"name": "dns", "ports": ["udp/53", "tcp/53"]},
    {"name": "ssh", "ports": ["tcp/22"]},
    {"name": "ping", "ports": ["icmp/8", "icmpv6/128"]},
    {"name": "metrics", "ports": ["tcp/9100", "tcp/9200-9299"]},
]
IP_LISTS: list[dict[str, Any]] = [
    {"name": "internet", "cidrs": ["0.0.0.0/0", "::/0"],
     "exclude": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"]},
    {"name": "corp", "cidrs": ["172.16.0.0/12", "192.168.0.0/16"], "exclude": ["172.31.0.0/16"]},
    {"name": "admins", "cidrs": ["10.250.0.0/24", "172.20.1.0-172.20.1.63"]},
    {"name": "partners", "cidrs": [f"198.51.{i}.0/24" for i in range(0, 100, 7)]
     + ["203.0.113.0/25", "2001:db8:100::/48"]},
    {"name": "monitoring", "cidrs": ["10.251.0.0/28"]},
]
# (consumer role or actor, provider role, service) of the tier rules of one app+env
TIERS: list[tuple[dict[str, Any], str, str]] = [
    ({"ip_list": "internet"}, "web", "https"),
    ({"labels": {"role": "web"}}, "api", "api"),
    ({"labels": {"role": "api"}}, "db", "mysql"),
    ({"labels": {"role": "api"}}, "cache", "redis"),
    ({"labels": {"role": "worker"}}, "db", "postgres"),
    ({"labels": {"role": "worker"}}, "api", "kafka"),
    ({"ip_list": "admins"}, "*", "ssh"),
    ({"ip_list": "monitoring"}, "*", "metrics"),
    ({"labels": {"role": "web"}}, "web", "http"),
    ({"labels": {"role": "api"}}, "api", "ping"),
    ({"labels": {"role": "worker"}}, "worker", "jmx"),
]


def _weighted(rng: random.Random, pairs: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([p for p, _ in pairs], weights=[w for _, w in pairs])[0]


def make_policy(n_workloads: int, n_rules: int, seed: int = 0) -> Policy:
    """A realistic synthetic policy with exactly `n_workloads` workloads and `n_rules` rules."""
    rng = random.Random(seed)
    n_apps = max(2, n_workloads // 100)
    apps = [f"app{i:03d}" for i in range(n_apps)]
    workloads: list[dict[str, Any]] = []
    blocks = [(a, e) for a in apps for e in ENVS]
    per_block = -(-n_workloads // len(blocks))
    # each app+env owns a /22 of 10.0.0.0/8 (1,020 usable hosts), addresses in order
    block_bits = max(10, (per_block + 4).bit_length())
    for i in range(n_workloads):
        b = i % len(blocks)
        app, env = blocks[b]
        serial = i // len(blocks)
        addr = (10 << 24) + (b << block_bits) + serial + 4
        role = rng.choices(ROLES, weights=ROLE_WEIGHTS)[0]
        w: dict[str, Any] = {
            "name": f"{app}-{env}-{role}-{serial}",
            "ips": [str(ipaddress.IPv4Address(addr))],
            "labels": {"role": role, "app": app, "env": env, "loc": rng.choice(LOCS)},
        }
        if rng.random() < 0.05:
            w["ips"].append(f"fd00:{b:x}::{serial + 4:x}")
        if rng.random() >= 0.1:
            w["managed"] = True
            enf = _weighted(rng, ENFORCEMENT)
            if enf != "visibility":
                w["enforcement"] = enf
        workloads.append(w)

    rules_left = n_rules
    rulesets: list[dict[str, Any]] = []
    n_global = max(1, n_rules // 20) if n_rules >= 4 else 0
    global_rules: list[dict[str, Any]] = []
    for g in range(n_global):
        kind = g % 5
        if kind == 0:
            global_rules.append({"action": "deny", "consumers": [{"labels": {"env": "dev"}}],
                                 "providers": [{"labels": {"env": {"group": "prod-like"}}}],
                                 "services": ["any"]})
        elif kind == 1:
            global_rules.append({"action": "override_deny",
                                 "consumers": [{"ip_list": "internet"}],
                                 "providers": [{"labels": {"role": ["db", "cache"]}}],
                                 "services": ["any"]})
        elif kind == 2:
            global_rules.append({"action": "deny", "consumers": [{"all_workloads": True}],
                                 "providers": [{"all_workloads": True}],
                                 "services": ["tcp/23", "tcp/445", "udp/161-162"]})
        elif kind == 3:
            app = rng.choice(apps)
            global_rules.append({"action": "allow", "consumers": [{"ip_list": "partners"}],
                                 "providers": [{"labels": {"app": app, "role": "api"}}],
                                 "services": ["https", "api"]})
        else:
            global_rules.append({"action": "override_deny",
                                 "consumers": [{"labels": {"env": "dev", "role": "worker"}}],
                                 "providers": [{"labels": {"app": rng.choice(apps),
                                                           "env": "prod"}}],
                                 "services": [rng.choice(["tcp/3306", "tcp/5432", "any"])]})
    if global_rules:
        rulesets.append({"name": "global-fences", "rules": global_rules})
        rules_left -= len(global_rules)

    k = 0
    while rules_left > 0:
        app, env = blocks[k % len(blocks)]
        rep = k // len(blocks)
        name = f"{app}-{env}" + (f"-{rep}" if rep else "")
        rules: list[dict[str, Any]] = []
        take = min(rules_left, rng.randint(4, 7))
        for j in range(take):
            if j == take - 1 and take >= 5:
                other = rng.choice(apps)
                rules.append({"action": "allow",
                              "consumers": [{"labels": {"app": other, "role": "api"}}],
                              "providers": [{"labels": {"role": "api"}}],
                              "services": ["api"], "extra_scope": True})
                continue
            cons, prov_role, svc = TIERS[(j + rep) % len(TIERS)]
            prov: dict[str, Any] = ({"all_workloads": True} if prov_role == "*"
                                    else {"labels": {"role": prov_role}})
            rules.append({"id": f"{name}/{svc}-{j}", "action": "allow", "consumers": [cons],
                          "providers": [prov], "services": [svc]})
        rulesets.append({"name": name, "scopes": [{"app": app, "env": env}], "rules": rules})
        rules_left -= take
        k += 1

    data: dict[str, Any] = {
        "version": 1,
        "label_groups": [{"name": "prod-like", "key": "env", "values": ["prod", "staging"]},
                         {"name": "all-envs", "key": "env", "values": ["dev"],
                          "groups": ["prod-like"]}],
        "ip_lists": IP_LISTS,
        "services": SERVICES,
        "workloads": workloads,
        "rulesets": rulesets,
    }
    return policy_from_data(data)


class FlowColumns(NamedTuple):
    src: npt.NDArray[np.uint32]
    dst: npt.NDArray[np.uint32]
    proto: npt.NDArray[np.uint8]
    port: npt.NDArray[np.int32]  # -1: no port


TIER_PORTS = np.array([443, 8080, 8085, 3306, 5432, 6379, 9092, 22, 9100, 80, 8000, 23, 445])
# the port a workload of each role usually serves (ROLES order)
ROLE_PORTS = np.array([[443, 443, 80, 8000], [8080, 8081, 8089, 9092],
                       [3306, 3306, 5432, 5432], [6379, 6379, 6379, 9100],
                       [9092, 9093, 8080, 22]])
# the roles a workload of each role usually talks to (ROLES order)
TIER_TARGETS = np.array([[1, 1, 0, 1], [2, 3, 2, 1], [2, 2, 2, 2], [3, 3, 3, 3],
                         [2, 1, 1, 4]])
EXTERNAL_POOLS = (("203.0.113.0", 256), ("198.51.0.0", 65536), ("8.8.0.0", 65536),
                  ("172.20.1.0", 64), ("10.250.0.0", 256), ("192.168.7.0", 256))


def make_flows(policy: Policy, n: int, seed: int = 0) -> FlowColumns:
    """`n` IPv4 flows over the policy's workloads as numpy columns (deterministic)."""
    rng = np.random.default_rng(seed)
    addrs: list[int] = []
    groups: list[tuple[str, str]] = []
    roles: list[int] = []
    for w in policy.workloads:
        v4 = [ip for ip in w.ips if ":" not in ip]
        if v4:
            addrs.append(int(ipaddress.IPv4Address(v4[0])))
            groups.append((w.label("app") or "", w.label("env") or ""))
            role = w.label("role")
            roles.append(ROLES.index(role) if role in ROLES else 0)
    if not addrs:
        raise ValueError("the policy has no workload with an IPv4 address")
    order = sorted(range(len(addrs)), key=lambda i: (groups[i], roles[i], addrs[i]))
    ws = np.array([addrs[i] for i in order], np.uint32)
    keys = [groups[i] for i in order]
    role_of = np.array([roles[i] for i in order], np.int64)
    gid = np.zeros(len(ws), np.int64)
    starts = [0]
    for i in range(1, len(keys)):
        if keys[i] != keys[i - 1]:
            starts.append(i)
        gid[i] = len(starts) - 1
    g_start = np.array(starts, np.int64)
    g_size = np.diff(np.append(g_start, len(ws)))
    # (group, role) -> contiguous run of workloads
    gr = gid * len(ROLES) + role_of
    gr_start = np.zeros(len(starts) * len(ROLES), np.int64)
    gr_size = np.zeros(len(starts) * len(ROLES), np.int64)
    uniq, first, counts = np.unique(gr, return_index=True, return_counts=True)
    gr_start[uniq] = first
    gr_size[uniq] = counts

    kind = rng.choice(4, size=n, p=[0.6, 0.2, 0.12, 0.08])
    src_i = rng.integers(0, len(ws), n)
    g = gid[src_i]
    want = TIER_TARGETS[role_of[src_i], rng.integers(0, TIER_TARGETS.shape[1], n)]
    k = g * len(ROLES) + want
    in_role = gr_start[k] + (rng.random(n) * gr_size[k]).astype(np.int64)
    in_group = g_start[g] + (rng.random(n) * g_size[g]).astype(np.int64)
    intra = np.where(gr_size[k] > 0, in_role, in_group)
    anywhere = rng.integers(0, len(ws), n)
    dst_i = np.where(kind == 0, intra, anywhere)
    src = ws[src_i]
    dst = ws[dst_i]
    pool = rng.integers(0, len(EXTERNAL_POOLS), n)
    bases = np.array([int(ipaddress.IPv4Address(b)) for b, _ in EXTERNAL_POOLS], np.int64)
    sizes = np.array([s for _, s in EXTERNAL_POOLS], np.int64)
    external = (bases[pool] + (rng.random(n) * sizes[pool]).astype(np.int64)).astype(np.uint32)
    src = np.where(kind == 2, external, src).astype(np.uint32)
    dst = np.where(kind == 3, external, dst).astype(np.uint32)

    proto = np.full(n, 6, np.uint8)
    port = TIER_PORTS[rng.integers(0, len(TIER_PORTS), n)].astype(np.int32)
    served = ROLE_PORTS[role_of[dst_i], rng.integers(0, ROLE_PORTS.shape[1], n)]
    port = np.where((kind <= 1) & (rng.random(n) < 0.7), served, port).astype(np.int32)
    r = rng.random(n)
    high = r < 0.15
    port[high] = rng.integers(1024, 65536, int(high.sum()))
    udp = (r >= 0.15) & (r < 0.22)
    proto[udp] = 17
    port[udp] = np.where(rng.random(int(udp.sum())) < 0.7, 53, 161)
    icmp = (r >= 0.22) & (r < 0.25)
    proto[icmp] = 1
    port[icmp] = np.where(rng.random(int(icmp.sum())) < 0.8, 8, 0)
    other = (r >= 0.25) & (r < 0.26)
    proto[other] = 47
    port[other] = -1
    return FlowColumns(src, dst, proto, port)
