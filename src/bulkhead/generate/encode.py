"""Flows → distinct edges, without a Python object per flow.

Theory of operation
-------------------
Every distinct address becomes an *entity* (dictionary encoding of the address column); an
entity is a workload's address or an external address. Protocol, port and process are folded
into a *service* code with `np.unique`. A flow is then three small integers, and the flows of
one (source entity, destination entity, service) are summed into one *edge* with `np.unique`
over a single int64 key plus `np.bincount` / `reduceat` for counts and first/last seen. Every
later step (noise, scope, existing policy, rules, coverage) works on edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bulkhead.domain.model import Policy

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class FlowColumns:
    """Flows as columns. `dst_port` is -1 for "no port"; `process` None or a column of
    str/None; `ts` epoch seconds; `count` the connections a row stands for (default 1)."""

    src_ip: Sequence[str]
    dst_ip: Sequence[str]
    proto: npt.ArrayLike
    dst_port: npt.ArrayLike
    process: Sequence[str | None] | None = None
    ts: npt.ArrayLike | None = None
    count: npt.ArrayLike | None = None

    def __len__(self) -> int:
        return len(self.src_ip)


@dataclass
class Entities:
    ips: list[str]  # entity -> address
    workload: npt.NDArray[np.int32]  # entity -> workload index, -1 external


@dataclass
class ServiceTable:
    proto: npt.NDArray[np.int32]
    port: npt.NDArray[np.int32]
    process: list[str | None]


@dataclass
class Edges:
    """Distinct (src entity, dst entity, service) with their evidence."""

    src: I64
    dst: I64
    svc: I64
    flows: I64  # rows x count
    first: F64
    last: F64

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def take(self, mask: Bools) -> Edges:
        return Edges(self.src[mask], self.dst[mask], self.svc[mask], self.flows[mask],
                     self.first[mask], self.last[mask])


@dataclass
class Encoded:
    entities: Entities
    services: ServiceTable
    src: I64  # per flow
    dst: I64
    svc: I64
    ts: F64
    weight: I64


def _codes(column: Sequence[str], index: dict[str, int]) -> I64:
    setdefault = index.setdefault
    return np.fromiter((setdefault(x, len(index)) for x in column), np.int64, len(column))


def encode(policy: Policy, flows: FlowColumns) -> Encoded:
    n = len(flows)
    index: dict[str, int] = {}
    src = _codes(flows.src_ip, index)
    dst = _codes(flows.dst_ip, index)
    if len(flows.dst_ip) != n:
        raise ValueError(f"dst_ip has {len(flows.dst_ip)} rows, src_ip has {n}")
    ips = list(index)
    by_ip = {ip: i for i, w in enumerate(policy.workloads) for ip in w.ips}
    workload = np.fromiter((by_ip.get(ip, -1) for ip in ips), np.int32, len(ips))
    proto = np.asarray(flows.proto, dtype=np.int64).reshape(-1)
    port = np.asarray(flows.dst_port, dtype=np.int64).reshape(-1)
    if proto.shape[0] != n or port.shape[0] != n:
        raise ValueError("proto and dst_port must have one value per flow")
    procs: list[str | None] = [None]
    if flows.process is not None:
        pidx: dict[str | None, int] = {None: 0}
        pcode = np.fromiter((pidx.setdefault(p or None, len(pidx)) for p in flows.process),
                            np.int64, n)
        procs = list(pidx)
    else:
        pcode = np.zeros(n, np.int64)
    key = (proto * 65537 + (np.clip(port, -1, 65535) + 1)) * len(procs) + pcode
    ukey, svc = np.unique(key, return_inverse=True)
    sp = ukey // len(procs)
    services = ServiceTable((sp // 65537).astype(np.int32), (sp % 65537 - 1).astype(np.int32),
                            [procs[int(i)] for i in ukey % len(procs)])
    ts = (np.zeros(n) if flows.ts is None
          else np.asarray(flows.ts, dtype=np.float64).reshape(-1))
    weight = (np.ones(n, np.int64) if flows.count is None
              else np.asarray(flows.count, dtype=np.int64).reshape(-1))
    return Encoded(Entities(ips, workload), services, src, dst, svc.astype(np.int64).reshape(-1),
                   ts, weight)


def aggregate(enc: Encoded, mask: Bools) -> Edges:
    """The edges of the flows selected by `mask`."""
    s, d, v = enc.src[mask], enc.dst[mask], enc.svc[mask]
    ts, w = enc.ts[mask], enc.weight[mask]
    if s.shape[0] == 0:
        z = np.zeros(0, np.int64)
        return Edges(z, z, z, z, np.zeros(0), np.zeros(0))
    n_ent = len(enc.entities.ips)
    n_svc = len(enc.services.process)
    key = (s * n_ent + d) * n_svc + v
    order = np.argsort(key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    uk = ks[starts]
    flows = np.add.reduceat(w[order], starts)
    tso = ts[order]
    first = np.minimum.reduceat(tso, starts)
    last = np.maximum.reduceat(tso, starts)
    return Edges(uk // n_svc // n_ent, uk // n_svc % n_ent, uk % n_svc, flows.astype(np.int64),
                 first, last)
