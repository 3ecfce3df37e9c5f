"""The console's dependency map: recorded flows as edges between workloads (or external
addresses), each edge decided under a policy ("active", "draft" or a version).

One edge = (src node, dst node, proto, dst port, process). A node is a workload name, or
`ip:<address>` for an end no workload owns. The flows are first grouped by what decides them
(`traffic.DECIDING` plus both workload names), each distinct tuple is evaluated once with the
cached `BatchEvaluator`, and the tuples are folded into edges with their connections split by
decision class (allowed / potentially_blocked / blocked / unknown) and the ids of the rules
that decide them. The console groups nodes by label itself, so expanding a group costs no
request. Edges go out column-wise (a 20,000-edge map is one small JSON document).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bulkhead.domain.model import Policy, Workload
from bulkhead.flows.store import FlowFilter, FlowStore
from bulkhead.policy.batch import BatchResult
from bulkhead.policy.evaluate import DECISIONS
from bulkhead.server.errors import FieldError, Invalid
from bulkhead.server.services import traffic as traffic_svc

CLASSES = ("allowed", "potentially_blocked", "blocked", "unknown")
MAX_EDGES = 100_000
GROUP = ["src_workload", "dst_workload", *traffic_svc.DECIDING]
EDGE_COLUMNS = ("src", "dst", "proto", "port", "process", "flows", "connections", "bytes",
                "first_seen", "last_seen", *CLASSES, "rules")


def decision_class(decision: str) -> str:
    """The map colour of a decision: allowed, potentially_blocked, blocked or unknown."""
    for c in CLASSES[:3]:
        if decision.startswith(c):
            return c
    return "unknown"


# decision code -> class index
_CLASS_OF = np.array([CLASSES.index(decision_class(d)) for d in DECISIONS], dtype=np.int64)


def fold_edges(groups: pa.Table, res: BatchResult, *, limit: int = MAX_EDGES
               ) -> dict[str, list[Any]]:
    """Deciding tuples (with flows/connections/bytes/first_seen/last_seen) folded into edges,
    column-wise, heaviest first (vectorised: Arrow group-by, no per-row Python)."""
    n = groups.num_rows
    if n == 0:
        return {k: [] for k in EDGE_COLUMNS}
    conns = groups.column("connections").to_numpy(zero_copy_only=False).astype(np.int64)
    cls = _CLASS_OF[res.decision.astype(np.int64)]
    cols: dict[str, Any] = {
        "src": pc.coalesce(groups.column("src_workload"),
                           pc.binary_join_element_wise("ip:", groups.column("src_ip"), "")),
        "dst": pc.coalesce(groups.column("dst_workload"),
                           pc.binary_join_element_wise("ip:", groups.column("dst_ip"), "")),
        "proto": groups.column("proto"), "port": groups.column("dst_port"),
        "process": groups.column("process"),
        "flows": groups.column("flows"), "connections": groups.column("connections"),
        "bytes": groups.column("bytes"),
        "first_seen": pc.divide(groups.column("first_seen").cast(pa.int64()), 1_000_000),
        "last_seen": pc.divide(groups.column("last_seen").cast(pa.int64()), 1_000_000),
        "pattern": pa.array(res.pattern.astype(np.int32)),
    }
    for k, c in enumerate(CLASSES):
        cols[c] = pa.array(np.where(cls == k, conns, 0))
    keys = ["src", "dst", "proto", "port", "process"]
    sums = ["flows", "connections", "bytes", *CLASSES]
    table = pa.table(cols).group_by(keys, use_threads=False).aggregate(
        [(c, "sum") for c in sums] + [("first_seen", "min"), ("last_seen", "max"),
                                      ("pattern", "distinct")])
    table = table.rename_columns([_unsuffix(c) for c in table.column_names])
    table = table.sort_by([("connections", "descending"), ("src", "ascending"),
                           ("dst", "ascending"), ("proto", "ascending"),
                           ("port", "ascending")]).slice(0, limit)
    out: dict[str, list[Any]] = {k: table.column(k).to_pylist() for k in EDGE_COLUMNS
                                 if k != "rules"}
    # one shared list per pattern: most edges have a single pattern, so this allocates little
    per_pattern = [sorted(set(p)) for p in res.patterns]
    out["rules"] = [per_pattern[ps[0]] if len(ps) == 1
                    else sorted(set().union(*(res.patterns[p] for p in ps)))
                    for ps in table.column("pattern").to_pylist()]
    return out


def _unsuffix(name: str) -> str:
    for suffix in ("_sum", "_min", "_max", "_distinct"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _labels_match(w: Workload | None, wanted: Sequence[tuple[str, tuple[str, ...]]]) -> bool:
    if w is None:
        return False
    return all(w.label(k) in values for k, values in wanted)


def parse_label_filter(values: Sequence[str], where: str = "query:label"
                       ) -> list[tuple[str, tuple[str, ...]]]:
    """`app=shop` / `env=prod,staging` (repeatable; keys AND, values OR)."""
    out: dict[str, list[str]] = {}
    for v in values:
        key, eq, vals = v.partition("=")
        items = [x.strip() for x in vals.split(",") if x.strip()]
        if not eq or not key.strip() or not items:
            raise Invalid("invalid label filter",
                          [FieldError(where, f"expected KEY=VALUE[,VALUE], got {v!r}")])
        out.setdefault(key.strip(), []).extend(items)
    return [(k, tuple(dict.fromkeys(v))) for k, v in out.items()]


def state_stamp(session: Session) -> tuple[Any, ...]:
    """Changes whenever a policy's value could: the latest version, the draft revision, and
    the workloads and label keys (count, max id, sum of revisions, last update)."""
    from bulkhead.server.models.policy import LabelKey, PolicyDraft, PolicyVersion, WorkloadRow

    version = session.scalar(select(func.max(PolicyVersion.id)))
    draft = session.scalar(select(PolicyDraft.revision).where(PolicyDraft.id == 1))
    wl = session.execute(select(func.count(), func.max(WorkloadRow.id),
                                func.sum(WorkloadRow.revision),
                                func.max(WorkloadRow.updated_at))).one()
    keys = session.execute(select(func.count(), func.sum(LabelKey.revision))).one()
    return (version, draft, *wl, *keys)


class _Snapshots:
    """The last few (policy, workloads) per (ref, state stamp): loading a policy with the
    whole inventory costs ~0.3 s at 2,000 workloads, checking the stamp ~1 ms."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple[Any, ...], tuple[Policy, Sequence[Workload]]] = \
            OrderedDict()

    def get(self, session: Session, ref: str) -> tuple[Policy, Sequence[Workload]]:
        key = (ref, *state_stamp(session))
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        value = (traffic_svc.load_policy(session, ref), traffic_svc.load_inventory(session))
        with self.lock:
            self.cache[key] = value
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return value


SNAPSHOTS = _Snapshots()


def dependency_map(*, session: Session, store: FlowStore | None, ref: str,
                   filters: FlowFilter, labels: Sequence[tuple[str, tuple[str, ...]]] = (),
                   limit: int = MAX_EDGES,
                   loader: Callable[[Session, str], Policy] = traffic_svc.load_policy,
                   inventory: Callable[[Session], Sequence[Workload]]
                   = traffic_svc.load_inventory) -> dict[str, Any]:
    """The map under policy `ref`: edges (column-wise) and the workloads they touch.

    `labels` keeps the edges with at least one end carrying those labels."""
    if store is None:
        raise traffic_svc.Unavailable("no flow store is configured on this server")
    ref = traffic_svc.check_policy_ref(ref)
    if loader is traffic_svc.load_policy and inventory is traffic_svc.load_inventory:
        policy, inv = SNAPSHOTS.get(session, ref)
    else:  # overridden loaders (tests, other deployments): no caching
        policy, inv = loader(session, ref), inventory(session)
    ev = traffic_svc.EVALUATORS.get(policy)
    if filters.as_of is None:
        filters = replace(filters, as_of=store.high_water())
    try:
        groups = store.aggregate(filters, GROUP, order_by=None)
    except ValueError as exc:
        raise traffic_svc._invalid("query", exc) from None
    workloads = {w.name: w for w in inv}
    if labels and groups.num_rows:
        keep = pa.array([name for name, w in workloads.items() if _labels_match(w, labels)],
                        pa.string())
        mask = pc.or_(pc.is_in(groups.column("src_workload"), value_set=keep),
                      pc.is_in(groups.column("dst_workload"), value_set=keep))
        groups = groups.filter(pc.fill_null(mask, False))
    res = traffic_svc.evaluate_table(ev, groups) if groups.num_rows else _empty_result()
    edges = fold_edges(groups, res, limit=limit + 1)  # one more: was anything cut off?
    truncated = len(edges["src"]) > limit
    if truncated:
        edges = {k: v[:limit] for k, v in edges.items()}
    names = set(edges["src"]) | set(edges["dst"])
    nodes = {n: {"labels": dict(w.labels), "enforcement": w.enforcement, "managed": w.managed,
                 "ips": list(w.ips)}
             for n, w in workloads.items() if n in names}
    return {"policy": ref, "edges": edges, "workloads": nodes,
            "label_keys": sorted({k for w in workloads.values() for k, _ in w.labels}),
            "truncated": truncated}


def _empty_result() -> BatchResult:
    return BatchResult(np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.int32), [])
