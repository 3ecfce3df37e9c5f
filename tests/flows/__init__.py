"""Flow-store tests, and factories shared with the traffic API tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from bulkhead.domain.model import Policy
from bulkhead.flows.schema import TS_TYPE
from bulkhead.policy.evaluate import DECISIONS
from bulkhead.policy.fileformat import policy_from_data

T0 = datetime(2025, 3, 1, tzinfo=UTC)

# (name, ips, labels, managed, enforcement)
WORKLOADS: list[tuple[str, list[str], dict[str, str], bool, str]] = [
    ("web-1", ["10.0.1.10"], {"role": "web", "app": "shop", "env": "prod"}, True, "full"),
    ("web-2", ["10.0.1.11", "2001:db8::11"], {"role": "web", "app": "shop", "env": "prod"},
     True, "selective"),
    ("api-1", ["10.0.2.10"], {"role": "api", "app": "shop", "env": "prod"}, True, "full"),
    ("db-1", ["10.0.3.10"], {"role": "db", "app": "shop", "env": "prod"}, True, "visibility"),
    ("blog-1", ["10.1.0.5", "2001:db8:1::5"], {"role": "web", "app": "blog", "env": "dev"},
     True, "full"),
    ("legacy", ["10.9.9.9"], {"role": "db", "app": "blog", "env": "dev"}, False, "visibility"),
]
EXTERNAL = ["203.0.113.7", "198.51.100.20", "8.8.8.8", "2001:db8:ffff::1"]
PORTS = [443, 8080, 3306, 22, 53, 5432, 9999, 1234]
PROCESSES = [None, "nginx", "mysqld", "java"]
USERS = [None, "alice", "bob"]

POLICY_DATA: dict[str, Any] = {
    "version": 1,
    "ip_lists": [{"name": "internet", "cidrs": ["0.0.0.0/0", "::/0"],
                  "exclude": ["10.0.0.0/8"]},
                 {"name": "admins", "cidrs": ["198.51.100.0/24"]}],
    "services": [{"name": "https", "ports": ["tcp/443"]},
                 {"name": "mysql", "ports": ["tcp/3306"], "process": "mysqld"}],
    "user_groups": [{"name": "ops", "members": ["alice"]}],
    "workloads": [{"name": n, "ips": ips, "labels": labels, "managed": m, "enforcement": e}
                  for n, ips, labels, m, e in WORKLOADS],
    "rulesets": [
        {"name": "shop", "scopes": [{"app": "shop", "env": "prod"}], "rules": [
            {"id": "web-in", "action": "allow", "consumers": [{"ip_list": "internet"}],
             "providers": [{"labels": {"role": "web"}}], "services": ["https"]},
            {"id": "web-api", "action": "allow", "consumers": [{"labels": {"role": "web"}}],
             "providers": [{"labels": {"role": "api"}}], "services": ["tcp/8080"]},
            {"id": "api-db", "action": "allow", "consumers": [{"labels": {"role": "api"}}],
             "providers": [{"labels": {"role": "db"}}], "services": ["mysql"]},
            {"id": "no-db", "action": "deny", "consumers": [{"all_workloads": True}],
             "providers": [{"labels": {"role": "db"}}], "services": ["any"],
             "extra_scope": True},
        ]},
        {"name": "global", "rules": [
            {"id": "ssh-admins", "action": "allow", "consumers": [{"ip_list": "admins"}],
             "providers": [{"all_workloads": True}], "services": ["tcp/22"]},
            {"id": "ops-ssh", "action": "allow", "consumers": [{"user_group": "ops"}],
             "providers": [{"all_workloads": True}], "services": ["tcp/22", "tcp/5432"]},
            {"id": "fence", "action": "override_deny", "consumers": [{"labels": {"env": "dev"}}],
             "providers": [{"labels": {"env": "prod"}}], "services": ["any"]},
        ]},
    ],
}


def make_policy() -> Policy:
    return policy_from_data(POLICY_DATA)


def workload_of() -> dict[str, str]:
    return {ip: name for name, ips, *_ in WORKLOADS for ip in ips}


def label_rows() -> list[tuple[str, dict[str, str]]]:
    return [(name, labels) for name, _, labels, *_ in WORKLOADS]


def make_batch(n: int, seed: int = 0, *, start: datetime = T0,
               span: timedelta = timedelta(hours=6), **overrides: Any) -> pa.Table:
    """`n` plausible flow summaries over the test estate (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    addrs = [ip for _, ips, *_ in WORKLOADS for ip in ips] + EXTERNAL
    owner = workload_of()
    src = [addrs[i] for i in rng.integers(0, len(addrs), n)]
    dst = [addrs[i] for i in rng.integers(0, len(addrs), n)]
    t0 = int((start - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6)
    ts = t0 + rng.integers(0, int(span.total_seconds() * 1e6), n)
    ts.sort()
    proto = np.where(rng.random(n) < 0.85, 6, 17).astype(np.int16)
    cols: dict[str, Any] = {
        "ts": pa.array(ts, pa.int64()).cast(TS_TYPE),
        "first_seen": pa.array(ts, pa.int64()).cast(TS_TYPE),
        "last_seen": pa.array(ts + rng.integers(0, 60_000_000, n), pa.int64()).cast(TS_TYPE),
        "src_ip": src, "dst_ip": dst,
        "src_port": pa.array(rng.integers(1024, 65536, n), pa.int32()),
        "proto": proto,
        "dst_port": pa.array([PORTS[i] for i in rng.integers(0, len(PORTS), n)], pa.int32()),
        "process": [PROCESSES[i] for i in rng.integers(0, len(PROCESSES), n)],
        "unit": pa.nulls(n, pa.string()),
        "user": [USERS[i] for i in rng.integers(0, len(USERS), n)],
        "direction": ["in" if i else "out" for i in rng.integers(0, 2, n)],
        "reporter": [owner.get(d, "web-1") for d in dst],
        "src_workload": [owner.get(s) for s in src],
        "dst_workload": [owner.get(d) for d in dst],
        "connections": pa.array(rng.integers(1, 50, n), pa.int64()),
        "bytes": pa.array(rng.integers(0, 1_000_000, n), pa.int64()),
        "decision": [DECISIONS[i] for i in rng.integers(0, len(DECISIONS), n)],
        "rule": [None if i == 0 else f"r{i}" for i in rng.integers(0, 4, n)],
    }
    cols.update(overrides)
    return pa.table(cols)
