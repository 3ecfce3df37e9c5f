"""Policy generation use cases: candidates from the flow store, and applying one to the draft.

`generate_candidates` reads a time window of the flow store as Arrow columns (no Python object
per flow), loads the policy to extend (draft, active or a version, with the live inventory)
and runs the pure generator. `apply_candidate` adds a candidate's IP lists, services, rulesets
and tests to the draft through the draft services, so each object is validated and audited
like any edit, in the request's one transaction (all or nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from sqlalchemy.orm import Session

from bulkhead.domain.model import Policy
from bulkhead.flows.store import FlowFilter, FlowStore
from bulkhead.generate import FlowColumns, Options, generate
from bulkhead.generate.noise import DEFAULT_NOISE
from bulkhead.policy.fileformat import policy_to_data
from bulkhead.server.auth import Principal
from bulkhead.server.errors import FieldError, Invalid
from bulkhead.server.services import policy as policy_svc
from bulkhead.server.services import traffic as traffic_svc

COLUMNS = ("ts", "src_ip", "dst_ip", "proto", "dst_port", "process", "connections")
PolicyLoader = Callable[[Session, str], Policy]


def _time(text: str | None, field: str) -> datetime | None:
    if text is None:
        return None
    try:
        return traffic_svc.parse_time(text)
    except (ValueError, OverflowError) as exc:  # "-999999d" overflows the date range
        raise Invalid(f"invalid {field}", [FieldError(field, str(exc))]) from None


def _flows(store: FlowStore, start: datetime | None, end: datetime | None) -> FlowColumns:
    batches = list(store.scan(FlowFilter(start=start, end=end), columns=list(COLUMNS)))
    if batches:
        t = pa.Table.from_batches(batches)
    else:
        t = pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
    ts = t.column("ts").cast(pa.int64()).to_numpy() / 1e6 if len(t) else np.zeros(0)
    return FlowColumns(t.column("src_ip").to_pylist(), t.column("dst_ip").to_pylist(),
                       t.column("proto").to_numpy().astype(np.int64) if len(t) else [],
                       t.column("dst_port").to_numpy().astype(np.int64) if len(t) else [],
                       t.column("process").to_pylist(), ts,
                       t.column("connections").to_numpy() if len(t) else [])


def candidate_data(c: Any) -> dict[str, Any]:
    """A candidate in policy-file form: ready for `apply_candidate` or a file."""
    data = policy_to_data(Policy(ip_lists=c.ip_lists, services=c.services, rulesets=c.rulesets,
                                 tests=c.tests))
    return {"name": c.name, "granularity": c.granularity, "tolerance": c.tolerance,
            "report": c.report, **{k: data.get(k, []) for k in (
                "rulesets", "ip_lists", "services", "tests")}}


def generate_candidates(*, session: Session, store: FlowStore | None, loader: PolicyLoader,
                        ref: str = "draft", granularity: str | None = None,
                        scope: dict[str, str] | None = None, since: str | None = None,
                        until: str | None = None, train_until: str | None = None,
                        external: str = "cidr", noise: list[str] | None = None,
                        crown_jewels: list[dict[str, str]] | None = None) -> dict[str, Any]:
    s = traffic_svc._store(store)
    ref = traffic_svc.check_policy_ref(ref)
    start, end = _time(since, "since"), _time(until, "until")
    cut = _time(train_until, "train_until")
    policy = loader(session, ref)
    flows = _flows(s, start, end)
    opts = Options(granularity=granularity, scope=tuple(sorted((scope or {}).items())),
                   train_until=None if cut is None else cut.timestamp(), external=external,
                   noise=DEFAULT_NOISE if noise is None else tuple(noise),
                   crown_jewels=tuple(tuple(sorted(c.items())) for c in crown_jewels or []))
    try:
        result = generate(policy, flows, opts)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0] if ":" in str(exc) else ""
        raise Invalid("cannot generate with these options", [FieldError(field, str(exc))]
                      ) from None
    out = result.report
    return {"recommended": result.candidates[result.recommended].name,
            "policy": ref, "window": {"since": start and start.astimezone(UTC).isoformat(),
                                      "until": end and end.astimezone(UTC).isoformat()},
            "candidates": [candidate_data(c) for c in result.candidates], **out}


def apply_candidate(session: Session, *, actor: Principal, rulesets: list[dict[str, Any]],
                    ip_lists: list[dict[str, Any]], services: list[dict[str, Any]],
                    tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Create the candidate's objects in the draft (IP lists, services, then rulesets), and
    append its tests; every step validated and audited by `services.policy`."""
    created: dict[str, list[str]] = {"ip_lists": [], "services": [], "rulesets": []}
    for kind, items in (("ip_lists", ip_lists), ("services", services),
                        ("rulesets", rulesets)):
        for body in items:
            row = policy_svc.create_object(session, actor=actor, kind=kind, body=body)
            created[kind].append(row.name)
    if tests:
        current, _ = policy_svc.get_singleton(session, kind="tests")
        policy_svc.put_singleton(session, actor=actor, kind="tests",
                                 body=[*current, *tests])
    return {"created": created, "tests_added": len(tests),
            "revision": policy_svc.draft_revision(session)}
