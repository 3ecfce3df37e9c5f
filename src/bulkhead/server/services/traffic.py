"""Traffic explorer and what-if, over the flow store (`bulkhead.flows.store.FlowStore`).

Theory of operation
-------------------
Requests arrive as flat key/value pairs (the query string of `GET /traffic`, or the `filters`
object of `POST /traffic/what-if`); `parse_filters` turns them into one `FlowFilter`, naming
the offending parameter in every error. The explorer then either pages through flows (keyset
cursors from the store), or groups them (`aggregate`; its cursor holds the offset and the
snapshot mark, so later pages see the same data while flows keep arriving), or streams them as
CSV with no row cap.

What-if evaluates stored flows against a policy ("draft", "active" or a version number, with
the current inventory: `load_policy`) using `BatchEvaluator`:
- the summary (first page only, or on request) groups the selected flows by what decides
  them — (src_ip, dst_ip, proto, dst_port, process, unit, user) plus the reported decision —
  evaluates each distinct tuple once, and weights it by its flow and connection counts:
  counts per decision, per (reported -> what-if) change, and per rule (a rule "hits" a flow
  when it is among the flow's matching rules, as in `Evaluator.decide(...).rules`);
- the page evaluates its own flows and returns each decision, deciding side and rule ids.

Label filters and label grouping read the store's copy of the workload labels;
`sync_labels` refreshes it from the inventory (a no-op when nothing changed).

Functions are keyword-only, raise domain errors (`Invalid`, `Unavailable`), never HTTP ones.
"""

from __future__ import annotations

import importlib
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]
from sqlalchemy.orm import Session

from bulkhead.domain.model import Policy, Workload
from bulkhead.domain.ports import PortSpecError, parse_proto
from bulkhead.flows.csvflows import parse_ts
from bulkhead.flows.schema import COLUMNS
from bulkhead.flows.store import (
    FlowFilter,
    FlowStore,
    cursor_as_of,
    decode_cursor,
    encode_cursor,
)
from bulkhead.policy.batch import SIDES, BatchEvaluator, BatchResult
from bulkhead.policy.evaluate import DECISIONS
from bulkhead.server.errors import DomainError, FieldError, Invalid

PolicyLoader = Callable[[Session, str], Policy]
InventoryLoader = Callable[[Session], Sequence[Workload]]

DEFAULT_LIMIT = 100
MAX_PAGE = 10_000  # rows per page; pages are unlimited
EXPORT_BATCH = 65_536
LIST_KEYS: dict[str, str] = {  # query parameter -> FlowFilter field (value lists)
    "src": "src_workloads", "dst": "dst_workloads", "workload": "workloads",
    "src_ip": "src_ips", "dst_ip": "dst_ips", "ip": "ips",
    "decision": "decisions", "process": "processes", "unit": "units", "user": "users",
    "reporter": "reporters", "direction": "directions",
}
# FlowFilter field -> the parameter that sets it (to name it in errors)
PARAM_OF: dict[str, str] = {**{v: k for k, v in LIST_KEYS.items()}, "start": "from",
                            "end": "to", "ports": "port", "protos": "proto",
                            "src_labels": "src", "dst_labels": "dst"}
_RELATIVE = re.compile(r"^-(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LABEL_KEY = re.compile(r"^(src|dst)\.(.+)$")
# what decides a flow: the summary evaluates each distinct combination once
DECIDING = ("src_ip", "dst_ip", "proto", "dst_port", "process", "unit", "user")


class Unavailable(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, [], 503, "Service unavailable", "/problems/unavailable")


# -- parsing ----------------------------------------------------------------------------------

Params = Mapping[str, Sequence[str]] | Iterable[tuple[str, str]]


def _items(params: Params) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in params.items():
            values = [v] if isinstance(v, str | int | float) else list(v)
            out.extend((k, str(x)) for x in values)
        return out
    return [(k, str(v)) for k, v in params]


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 with a zone, epoch seconds, or relative to now: `-15m`, `-24h`, `-7d`."""
    m = _RELATIVE.match(text.strip())
    if m:
        now = now or datetime.now(UTC)
        try:
            return now - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:
            raise ValueError(f"time out of range: {text!r}") from None
    try:
        return datetime.fromtimestamp(parse_ts(text), UTC)
    except (OverflowError, OSError):
        raise ValueError(f"time out of range: {text!r}") from None


def _port_range(text: str) -> tuple[int, int]:
    lo_s, dash, hi_s = text.partition("-")
    digits = (lo_s, hi_s) if dash else (lo_s,)
    if not all(d.isascii() and d.isdigit() for d in digits):
        raise ValueError(f"not a port or port range: {text!r}")
    lo, hi = int(lo_s), int(hi_s) if dash else int(lo_s)
    if not 0 <= lo <= hi <= 65535:
        raise ValueError(f"not a port or port range: {text!r}")
    return lo, hi


def parse_filters(params: Params, *, where: str = "query",
                  ignore: Iterable[str] = ()) -> FlowFilter:
    """A `FlowFilter` from request parameters; repeated keys and comma lists OR together.

    Keys: from, to, src, dst, workload, src.KEY / dst.KEY (labels), src_ip, dst_ip, ip (address,
    CIDR or range), port (443 or 8000-8099), proto (tcp or 6), decision, process, unit, user,
    reporter, direction. Keys in `ignore` are skipped; any other key is an error."""
    skip = set(ignore)
    lists: dict[str, list[Any]] = {}
    labels: dict[str, dict[str, list[str]]] = {"src": {}, "dst": {}}
    times: dict[str, datetime] = {}
    errors: list[FieldError] = []

    def path(key: str) -> str:
        return f"{where}:{key}" if where == "query" else f"{where}.{key}"

    def bad(key: str, message: str) -> None:
        errors.append(FieldError(path(key), message))

    for key, value in _items(params):
        if key in skip:
            continue
        label = _LABEL_KEY.match(key)
        try:
            if key in ("from", "to"):
                times[key] = parse_time(value)
            elif key in LIST_KEYS:
                lists.setdefault(LIST_KEYS[key], []).extend(_split(value))
            elif key == "port":
                lists.setdefault("ports", []).extend(_port_range(v) for v in _split(value))
            elif key == "proto":
                lists.setdefault("protos", []).extend(parse_proto(v) for v in _split(value))
            elif label:
                values = _split(value)
                if not values:
                    raise ValueError("expected one or more values (comma-separated)")
                labels[label.group(1)].setdefault(label.group(2), []).extend(values)
            else:
                bad(key, "unknown parameter")
        except (ValueError, PortSpecError) as exc:
            bad(key, str(exc))
    for name in ("decisions", "directions"):
        allowed = DECISIONS if name == "decisions" else ("in", "out")
        for v in lists.get(name, []):
            if v not in allowed:
                bad(name[:-1], f"{v!r} is not one of {', '.join(allowed)}")
    if "from" in times and "to" in times and times["from"] >= times["to"]:
        bad("to", "must be after 'from'")
    if errors:
        raise Invalid(f"{len(errors)} invalid filter(s)", errors)
    fields: dict[str, Any] = {k: tuple(dict.fromkeys(v)) for k, v in lists.items()}
    for side in ("src", "dst"):
        if labels[side]:
            fields[f"{side}_labels"] = tuple(
                (k, tuple(dict.fromkeys(v))) for k, v in labels[side].items())
    try:
        return FlowFilter(start=times.get("from"), end=times.get("to"), **fields)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise Invalid("invalid filter", [FieldError(path(PARAM_OF.get(field, field)),
                                                    message)]) from None


def parse_group_by(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    parts = _split(value) if isinstance(value, str) else [p for v in value for p in _split(v)]
    return tuple(parts)


def uses_labels(filters: FlowFilter, group_by: Sequence[str] = (), level: str = "") -> bool:
    return bool(filters.src_labels or filters.dst_labels
                or any("." in g for g in group_by)
                or (level not in ("", "workload", "ip")))


# -- rows as JSON -----------------------------------------------------------------------------

def _iso_columns(table: pa.Table) -> pa.Table:
    for i, fld in enumerate(table.schema):
        if pa.types.is_timestamp(fld.type):
            col = pc.strftime(table.column(i), format="%Y-%m-%dT%H:%M:%SZ")
            table = table.set_column(i, fld.name, col)
    return table


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows as JSON-ready dicts (timestamps as RFC 3339 UTC strings)."""
    return _iso_columns(table).to_pylist()  # type: ignore[no-any-return]


def _store(store: FlowStore | None) -> FlowStore:
    if store is None:
        raise Unavailable("no flow store is configured on this server")
    return store


def _invalid(where: str, exc: ValueError) -> Invalid:
    """A store/filter ValueError ("field: message") as 422; `where` is "query" for query
    parameters, "" for body fields."""
    field, _, message = str(exc).partition(": ")
    if not message:
        field, message = "", str(exc)
    path = f"{where}:{field}" if where == "query" else field
    return Invalid(str(exc), [FieldError(path, message)])


# -- explorer ---------------------------------------------------------------------------------

def list_flows(*, store: FlowStore | None, filters: FlowFilter, limit: int = DEFAULT_LIMIT,
               cursor: str | None = None, newest_first: bool = False) -> dict[str, Any]:
    try:
        table, nxt = _store(store).query(filters, limit=min(limit, MAX_PAGE), cursor=cursor,
                                         newest_first=newest_first)
    except ValueError as exc:
        raise _invalid("query", exc) from None
    return {"items": rows(table), "next_cursor": nxt, "limit": limit}


def _group_fingerprint(filters: FlowFilter, group_by: Sequence[str],
                       order_by: str | None, approx: bool) -> str:
    return f"{filters.fingerprint()}|{','.join(group_by)}|{order_by}|{approx}"


def group_flows(*, store: FlowStore | None, filters: FlowFilter, group_by: Sequence[str],
                order_by: str | None = "connections", limit: int = DEFAULT_LIMIT,
                cursor: str | None = None, approx: bool = False) -> dict[str, Any]:
    s = _store(store)
    limit = min(limit, MAX_PAGE)
    fp = _group_fingerprint(filters, group_by, order_by, approx)
    try:
        if cursor:
            state = decode_cursor(cursor, fp, "g")
            as_of, offset = int(state["as_of"]), int(state["o"])
        else:
            as_of, offset = (filters.as_of if filters.as_of is not None
                             else s.high_water()), 0
        table = s.aggregate(replace(filters, as_of=as_of), list(group_by), order_by=order_by,
                            limit=limit + 1, offset=offset, approx=approx)
    except ValueError as exc:
        raise _invalid("query", exc) from None
    nxt = None
    if table.num_rows > limit:
        table = table.slice(0, limit)
        nxt = encode_cursor({"k": "g", "f": fp, "as_of": as_of, "o": offset + limit})
    return {"group_by": list(group_by), "items": rows(table), "next_cursor": nxt,
            "limit": limit}


def edges(*, store: FlowStore | None, filters: FlowFilter, level: str,
          limit: int | None = None, approx: bool = False) -> dict[str, Any]:
    try:
        table = _store(store).edges(filters, level, limit=limit, approx=approx)
    except ValueError as exc:
        raise _invalid("query", exc) from None
    return {"level": level, "items": rows(table)}


def export_csv(*, store: FlowStore | None, filters: FlowFilter,
               group_by: Sequence[str] = (), order_by: str | None = "connections",
               approx: bool = False) -> Iterator[bytes]:
    """The whole query as CSV (header first), streamed batch by batch; no row cap.

    Validation happens before the first byte, so a bad request is still a clean 422."""
    s = _store(store)
    filters = replace(filters, as_of=filters.as_of if filters.as_of is not None
                      else s.high_water())
    try:
        if group_by:
            table = s.aggregate(filters, list(group_by), order_by=order_by, approx=approx)
            batches: Iterable[pa.RecordBatch] = table.to_batches(EXPORT_BATCH)
            names = table.column_names
        else:
            batches = s.scan(filters, batch_rows=EXPORT_BATCH)
            names = ["id", *COLUMNS]
    except ValueError as exc:
        raise _invalid("query", exc) from None
    return _csv_chunks(batches, names)


def _csv_chunks(batches: Iterable[pa.RecordBatch], names: Sequence[str]) -> Iterator[bytes]:
    first = True
    for batch in batches:
        if batch.num_rows == 0:
            continue
        table = _iso_columns(pa.Table.from_batches([batch]))
        buf = io.BytesIO()
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=first))
        first = False
        yield buf.getvalue()
    if first:  # no rows: still a header
        yield (",".join(f'"{n}"' for n in names) + "\n").encode()


# -- inventory and policies -------------------------------------------------------------------

def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def load_inventory(session: Session) -> Sequence[Workload]:
    """Every workload of the inventory (`services.inventory.inventory_workloads`)."""
    inv = _module("bulkhead.server.services.inventory")
    if inv is None or not hasattr(inv, "inventory_workloads"):
        return ()
    return tuple(inv.inventory_workloads(session))


def load_policy(session: Session, ref: str) -> Policy:
    """The policy `ref` ("draft", "active", or a version number) with the current inventory,
    from `services.versions` (its `policy_for(session, ref)` if present, else its export)."""
    svc = _module("bulkhead.server.services.versions")
    if svc is None:
        raise Unavailable("policy versions are not available in this build")
    fn = getattr(svc, "policy_for", None)
    if fn is not None:
        return fn(session, ref)  # type: ignore[no-any-return]
    from bulkhead.policy.fileformat import policy_from_data

    data, _ = svc.export_data(session, ref=ref, workloads=True)
    return policy_from_data(data)


def sync_labels(*, session: Session, store: FlowStore | None,
                inventory: InventoryLoader = load_inventory) -> bool:
    """Refresh the store's workload labels from the inventory; True if they changed."""
    return _store(store).set_workloads(inventory(session))


def check_policy_ref(ref: str, where: str = "policy") -> str:
    ref = ref.strip()
    if ref in ("draft", "active") or ((ref.isascii() and ref.isdigit()) and int(ref) > 0):
        return ref
    raise Invalid("invalid policy reference",
                  [FieldError(where, "expected 'draft', 'active' or a version number")])


class _Evaluators:
    """A few recent `BatchEvaluator`s keyed by policy value (building one costs ~1 s at 10k
    workloads; evaluation itself is cheap)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.cache: OrderedDict[Policy, BatchEvaluator] = OrderedDict()

    def get(self, policy: Policy) -> BatchEvaluator:
        with self.lock:
            ev = self.cache.get(policy)
            if ev is not None:
                self.cache.move_to_end(policy)
                return ev
        ev = BatchEvaluator(policy)
        with self.lock:
            self.cache[policy] = ev
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return ev


EVALUATORS = _Evaluators()


# -- what-if ----------------------------------------------------------------------------------

def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()  # type: ignore[no-any-return]


def evaluate_table(ev: BatchEvaluator, table: pa.Table) -> BatchResult:
    """Decide every row of a table with the deciding columns (`DECIDING`)."""
    return ev.evaluate(
        _column(table, "src_ip"), _column(table, "dst_ip"),
        table.column("proto").to_numpy(zero_copy_only=False).astype(np.int16),
        table.column("dst_port").to_numpy(zero_copy_only=False).astype(np.int32),
        process=_column(table, "process"), unit=_column(table, "unit"),
        user=_column(table, "user"))


def what_if_summary(ev: BatchEvaluator, groups: pa.Table) -> dict[str, Any]:
    """Counts over `groups` (one row per distinct deciding tuple + reported decision, with
    `flows` and `connections`): by decision, by change, by rule."""
    n = groups.num_rows
    flows = groups.column("flows").to_numpy(zero_copy_only=False).astype(np.int64)
    conns = groups.column("connections").to_numpy(zero_copy_only=False).astype(np.int64)
    if n == 0:
        return {"flows": 0, "connections": 0, "decisions": {}, "reported": {},
                "changes": [], "rules": []}
    res = evaluate_table(ev, groups)
    decision = res.decision.astype(np.int64)
    k = len(DECISIONS)
    by_flows = np.bincount(decision, weights=flows, minlength=k)
    by_conns = np.bincount(decision, weights=conns, minlength=k)
    reported_codes = {d: i for i, d in enumerate(DECISIONS)}
    reported = np.fromiter((reported_codes[d] for d in _column(groups, "decision")), np.int64,
                           count=n)
    rep_flows = np.bincount(reported, weights=flows, minlength=k)
    rep_conns = np.bincount(reported, weights=conns, minlength=k)
    pair = reported * k + decision
    ch_flows = np.bincount(pair, weights=flows, minlength=k * k)
    ch_conns = np.bincount(pair, weights=conns, minlength=k * k)
    moved = [i for i in np.flatnonzero(ch_flows).tolist() if i // k != i % k]
    moved.sort(key=lambda i: (-ch_flows[i], DECISIONS[i // k], DECISIONS[i % k]))
    changes = [{"from": DECISIONS[i // k], "to": DECISIONS[i % k], "flows": int(ch_flows[i]),
                "connections": int(ch_conns[i])} for i in moved]
    npat = len(res.patterns)
    pat_flows = np.bincount(res.pattern, weights=flows, minlength=npat)
    pat_conns = np.bincount(res.pattern, weights=conns, minlength=npat)
    hits: dict[str, list[int]] = {}
    for p, ids in enumerate(res.patterns):
        for rid in ids:
            h = hits.setdefault(rid, [0, 0])
            h[0] += int(pat_flows[p])
            h[1] += int(pat_conns[p])
    order = sorted(hits, key=lambda r: (-hits[r][0], r))
    rules = [{"rule": r, "flows": hits[r][0], "connections": hits[r][1]} for r in order]
    return {
        "flows": int(flows.sum()), "connections": int(conns.sum()),
        "decisions": {DECISIONS[i]: {"flows": int(by_flows[i]), "connections": int(by_conns[i])}
                      for i in range(k) if by_flows[i]},
        "reported": {DECISIONS[i]: {"flows": int(rep_flows[i]),
                                    "connections": int(rep_conns[i])}
                     for i in range(k) if rep_flows[i]},
        "changes": changes, "rules": rules,
    }


def what_if_page(ev: BatchEvaluator, page: pa.Table) -> list[dict[str, Any]]:
    """The page's flows with their what-if decision, deciding side and matching rules."""
    if page.num_rows == 0:
        return []
    res = evaluate_table(ev, page)
    keep = ["id", "ts", "src_ip", "dst_ip", "proto", "dst_port", "process", "unit", "user",
            "src_workload", "dst_workload", "connections", "bytes"]
    out = rows(page.select(keep))
    reported = _column(page, "decision")
    rule = _column(page, "rule")
    decisions = res.decisions()
    for i, item in enumerate(out):
        item["reported_decision"] = reported[i]
        item["reported_rule"] = rule[i]
        item["decision"] = decisions[i]
        item["side"] = SIDES[int(res.side[i])]
        item["rules"] = list(res.rules(i))
        item["changed"] = decisions[i] != reported[i]
    return out


def what_if(*, session: Session, store: FlowStore | None, ref: str, filters: FlowFilter,
            limit: int = DEFAULT_LIMIT, cursor: str | None = None,
            summary: bool | None = None, loader: PolicyLoader = load_policy,
            ) -> dict[str, Any]:
    """Evaluate the selected stored flows against policy `ref` (see the module docstring)."""
    s = _store(store)
    ref = check_policy_ref(ref)
    policy = loader(session, ref)
    ev = EVALUATORS.get(policy)
    limit = min(limit, MAX_PAGE)
    if filters.as_of is None and cursor is None:
        filters = replace(filters, as_of=s.high_water())
    try:
        page, nxt = s.query(filters, limit=limit, cursor=cursor)
        out: dict[str, Any] = {"policy": ref}
        if summary is None:
            summary = cursor is None
        if summary:
            if cursor is not None:  # the snapshot of the pages
                filters = replace(filters, as_of=cursor_as_of(cursor))
            groups = s.aggregate(filters, [*DECIDING, "decision"], order_by=None)
            out["summary"] = what_if_summary(ev, groups)
    except ValueError as exc:
        raise _invalid("", exc) from None
    out["items"] = what_if_page(ev, page)
    out["next_cursor"] = nxt
    out["limit"] = limit
    return out
