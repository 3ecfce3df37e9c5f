"""A synthetic estate with a known intended policy, and flows drawn from it (tests, bench).

Per application and environment: `web` (tcp/443 from the internet), `api` (tcp/8080 from web
and worker), `db` (tcp/5432 from api), `worker` (tcp/9000-9003 from api; api also calls an
external partner on tcp/443). Shared: `infra` servers for `ldap` (tcp/636, from every app: a
core service), `dns` (udp/53 from everyone: noise) and a `monitor` host scraping tcp/9100
everywhere (noise). Optionally one api replica per app lacks its `role` label. Flows are drawn
edge by edge with numpy (no Python object per flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bulkhead.domain.model import Policy, Workload
from bulkhead.generate.encode import FlowColumns

ROLES = ("web", "api", "db", "worker")
PARTNER = "192.0.2.10"
CLIENT_NETS = ("198.51.100.", "203.0.113.")


@dataclass(frozen=True)
class Intent:
    """One intended edge: consumers and providers as selectors (or 'internet' / an address)."""

    consumer: tuple[tuple[str, str], ...] | str
    provider: tuple[tuple[str, str], ...] | str
    proto: int
    ports: tuple[int, ...]
    weight: float
    noise: bool = False


def _ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}"


def estate(apps: int = 4, envs: tuple[str, ...] = ("prod",), replicas: int = 2,
           unlabelled: bool = True, cross_app: bool = True) -> tuple[Policy, list[Intent]]:
    workloads: list[Workload] = []
    n = 256

    def add(name: str, labels: dict[str, str]) -> None:
        nonlocal n
        n += 1
        workloads.append(Workload(name, (_ip(n),), tuple(sorted(labels.items())),
                                  managed=True))

    intents: list[Intent] = []
    for env in envs:
        for a in range(apps):
            app = f"app{a}"
            for role in ROLES:
                for r in range(replicas):
                    add(f"{app}-{env}-{role}-{r}", {"role": role, "app": app, "env": env})
            if unlabelled:
                add(f"{app}-{env}-api-x", {"app": app, "env": env})

            def sel(role: str, app: str = app, env: str = env) -> tuple[tuple[str, str], ...]:
                return (("app", app), ("env", env), ("role", role))
            intents += [
                Intent("internet", sel("web"), 6, (443,), 4.0),
                Intent(sel("web"), sel("api"), 6, (8080,), 6.0),
                Intent(sel("worker"), sel("api"), 6, (8080,), 2.0),
                Intent(sel("api"), sel("db"), 6, (5432,), 5.0),
                Intent(sel("api"), sel("worker"), 6, (9000, 9001, 9002, 9003), 2.0),
                Intent(sel("api"), PARTNER, 6, (443,), 1.0),
                Intent((("app", app), ("env", env)), (("role", "ldap"),), 6, (636,), 1.0),
                Intent((("app", app), ("env", env)), (("role", "dns"),), 17, (53,), 2.0, True),
            ]
            if cross_app and a % 2 == 1:
                intents.append(Intent(sel("api"), sel("api", f"app{a - 1}"), 6, (8080,), 1.0))
    for r in range(2):
        add(f"ldap-{r}", {"role": "ldap", "app": "infra", "env": "shared"})
        add(f"dns-{r}", {"role": "dns", "app": "infra", "env": "shared"})
    add("monitor-0", {"role": "monitor", "app": "infra", "env": "shared"})
    intents.append(Intent((("role", "monitor"),), (), 6, (9100,), 2.0, True))
    return Policy(workloads=tuple(workloads)), intents


class _Index:
    """Addresses by (key, value), so a selector's members are a set intersection."""

    def __init__(self, policy: Policy) -> None:
        self.by: dict[tuple[str, str], set[str]] = {}
        self.unlabelled: dict[tuple[str | None, str | None], list[str]] = {}
        self.order = {w.ips[0]: i for i, w in enumerate(policy.workloads)}
        for w in policy.workloads:
            for kv in w.labels:
                self.by.setdefault(kv, set()).add(w.ips[0])
            d = w.label_dict
            if "role" not in d:
                self.unlabelled.setdefault((d.get("app"), d.get("env")), []).append(w.ips[0])

    def members(self, sel: tuple[tuple[str, str], ...]) -> list[str]:
        """Labelled members; an api selector also draws the app's unlabelled api replica
        (it behaves as one)."""
        if not sel:
            found = set(self.order)
        else:
            found = set.intersection(*(self.by.get(kv, set()) for kv in sel))
        d = dict(sel)
        if d.get("role") == "api":
            found |= set(self.unlabelled.get((d.get("app"), d.get("env")), []))
        return sorted(found, key=self.order.__getitem__)


def flows(policy: Policy, intents: list[Intent], n: int, *, start: float, duration: float,
          seed: int = 0, noise: bool = True) -> FlowColumns:
    rng = np.random.default_rng(seed)
    intents = [i for i in intents if noise or not i.noise]
    w = np.asarray([i.weight for i in intents])
    which = rng.choice(len(intents), size=n, p=w / w.sum())
    src = np.empty(n, dtype=object)
    dst = np.empty(n, dtype=object)
    proto = np.empty(n, np.int16)
    port = np.empty(n, np.int32)
    clients = np.asarray([f"{CLIENT_NETS[k % 2]}{k % 200 + 1}" for k in range(400)],
                         dtype=object)
    index = _Index(policy)
    for j, it in enumerate(intents):
        rows = np.flatnonzero(which == j)
        if rows.shape[0] == 0:
            continue
        for side, out in ((it.consumer, src), (it.provider, dst)):
            if side == "internet":
                pool = clients
            elif isinstance(side, str):
                pool = np.asarray([side], dtype=object)
            else:
                pool = np.asarray(index.members(side), dtype=object)
            out[rows] = pool[rng.integers(0, pool.shape[0], rows.shape[0])]
        proto[rows] = it.proto
        port[rows] = np.asarray(it.ports)[rng.integers(0, len(it.ports), rows.shape[0])]
    same = src == dst
    if same.any():  # a host does not talk to itself: move those to the first intent's pair
        keep = ~same
        src, dst, proto, port = src[keep], dst[keep], proto[keep], port[keep]
        n = int(keep.sum())
    ts = np.sort(start + rng.random(n) * duration)
    return FlowColumns(src.tolist(), dst.tolist(), proto, port, None, ts,
                       rng.integers(1, 4, n))
