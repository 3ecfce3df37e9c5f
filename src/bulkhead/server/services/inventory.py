"""Inventory use cases: label keys, labels and workloads (live; never versioned).

Theory of operation. A workload is validated alone with the policy-file loader
(`policy_from_data({"label_keys": ..., "workloads": [w]})`, so the API, the file and the CSV
import share one set of rules and messages) and then against the database with indexed
queries: its name (unique index) and its addresses (`workload_ips`, primary key on the
address). Nothing here reads all workloads for a single-workload request.

Labels are created on demand: a workload that names an unknown value of a declared key creates
that label (audited); an undeclared key is a 422. A label in use cannot be deleted (409), nor
can a label key used by a workload, the draft or the active version.

The compiled `PolicyState` is told about workload changes only after the transaction commits
(`after_commit`): the hook re-reads the changed workloads from the database under one lock, so
whatever order concurrent commits finish in, the state converges on what is committed.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, insert, or_, select, tuple_
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import DEFAULT_LABEL_KEYS, ENFORCEMENT_STATES, Policy, Workload
from bulkhead.policy.fileformat import KEY_RE, policy_from_data, policy_to_data
from bulkhead.server.auth import Principal
from bulkhead.server.db import after_commit as db_after_commit
from bulkhead.server.db import utcnow
from bulkhead.server.errors import Conflict, DomainError, FieldError, Invalid, NotFound
from bulkhead.server.models.policy import Label, LabelKey, WorkloadIP, WorkloadLabel, WorkloadRow
from bulkhead.server.policystate import PolicyState
from bulkhead.server.services.audit import audit

log = logging.getLogger(__name__)
CHUNK = 500  # rows per IN (...) list
# More changed workloads than this: rebuild the compiled state in one go (about the cost of 10-20
# incremental updates at 10k workloads) instead of one incremental update each.
BULK_RELOAD = 20
WORKLOAD_FIELDS = ("name", "hostname", "ips", "labels", "managed", "enforcement", "os",
                   "description")


# -- errors ---------------------------------------------------------------------------------

class PreconditionFailed(DomainError):
    def __init__(self, detail: str, path: str = "header:If-Match") -> None:
        super().__init__(detail, [FieldError(path, detail)], 412, "Precondition failed",
                         "/problems/precondition-failed")


def not_found(what: str, name: str, param: str = "name") -> NotFound:
    err = NotFound(f"no {what} {name!r}")
    err.errors.append(FieldError(f"path:{param}", f"no {what} {name!r}"))
    return err


def check_revision(current: int, expected: Iterable[int] | None, what: str,
                   path: str = "header:If-Match") -> None:
    """Optimistic concurrency: `expected` are the revisions the caller last saw (None: any)."""
    if expected is None:
        return
    path = getattr(expected, "path", path)  # where the caller sent it (header or body)
    allowed = set(expected)
    if current not in allowed:
        raise PreconditionFailed(
            f"{what} changed since you read it (now revision {current}, you sent "
            f"{', '.join(str(r) for r in sorted(allowed)) or 'none'}); reload and retry", path)


def issues_to_errors(exc: PolicyError, strip: str = "", prefix: str = "") -> list[FieldError]:
    """Loader issues as field errors; paths under `strip` become relative to it."""
    out = []
    for issue in exc.issues:
        path = issue.path
        if strip and (path == strip or path.startswith((strip + ".", strip + "["))):
            path = path[len(strip):].lstrip(".")
        path = f"{prefix}{'.' if prefix and path and not path.startswith('[') else ''}{path}"
        msg = issue.message + (f" (line {issue.line})" if issue.line else "")
        out.append(FieldError(path, msg))
    return out


# -- after-commit hooks -----------------------------------------------------------------------

SYNC_LOCK = threading.RLock()
after_commit = db_after_commit  # kept here too: other services register hooks through it


def sync_workloads(session: Session, state: PolicyState | None, names: Iterable[str]) -> None:
    """After commit, bring `state` in line with the committed rows of `names`."""
    todo = set(names)
    if state is None or not todo:
        return
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    after_commit(session, lambda: _sync_workloads(engine, state, todo))


def _sync_workloads(engine: Engine, state: PolicyState, names: set[str]) -> None:
    with SYNC_LOCK, Session(engine) as s:
        if len(names) > BULK_RELOAD or state.compiler is None:
            from bulkhead.server.services.versions import load_active

            load_active(s, state)
            return
        found = {r.name: to_workload(r) for r in _rows_named(s, names)}
        for n in sorted(names):
            if n in found:
                state.update_workload(found[n])
            else:
                state.remove_workload(n)


# -- label keys -------------------------------------------------------------------------------

def ensure_label_keys(session: Session) -> None:
    """Seed the default keys into an empty store (called once, when the draft is created)."""
    if session.scalar(select(func.count()).select_from(LabelKey)) == 0:
        for i, k in enumerate(DEFAULT_LABEL_KEYS):
            session.add(LabelKey(name=k, position=i))
        session.flush()


def list_label_keys(session: Session) -> list[LabelKey]:
    return list(session.scalars(select(LabelKey).order_by(LabelKey.position)))


def label_key_names(session: Session) -> tuple[str, ...]:
    return tuple(session.scalars(select(LabelKey.name).order_by(LabelKey.position)))


def key_usage(session: Session) -> dict[str, int]:
    q = (select(Label.key, func.count(WorkloadLabel.workload_id))
         .join(WorkloadLabel, WorkloadLabel.label_id == Label.id).group_by(Label.key))
    return {k: int(n) for k, n in session.execute(q)}


def get_label_key(session: Session, *, name: str) -> LabelKey:
    row = session.get(LabelKey, name)
    if row is None:
        raise not_found("label key", name)
    return row


def label_key_data(row: LabelKey) -> dict[str, Any]:
    return {"name": row.name, **({"description": row.description} if row.description else {})}


def create_label_key(session: Session, *, actor: Principal, name: str,
                     description: str | None = None) -> LabelKey:
    if not KEY_RE.match(name):
        raise Invalid("invalid label key", [FieldError(
            "name", f"invalid label key {name!r} (lower case letter first, then lower case, "
                    "digits, _ . -; at most 63)")])
    if session.get(LabelKey, name) is not None:
        raise Conflict(f"label key {name!r} exists", [FieldError("name", "already exists")])
    pos = session.scalar(select(func.max(LabelKey.position)))
    row = LabelKey(name=name, position=(pos if pos is not None else -1) + 1,
                   description=description)
    session.add(row)
    _flush_or_conflict(session, f"label key {name!r} exists", "name")
    audit(session, actor=actor, action="label_key.create", target=f"label_key:{name}",
          after=label_key_data(row))
    return row


def update_label_key(session: Session, *, actor: Principal, name: str,
                     description: str | None, expected: Iterable[int] | None = None
                     ) -> LabelKey:
    row = get_label_key(session, name=name)
    check_revision(row.revision, expected, f"label key {name!r}")
    before = label_key_data(row)
    if row.description != description:
        row.description = description
        row.revision += 1
        audit(session, actor=actor, action="label_key.update", target=f"label_key:{name}",
              before=before, after=label_key_data(row))
    return row


def delete_label_key(session: Session, *, actor: Principal, name: str,
                     expected: Iterable[int] | None = None) -> None:
    from bulkhead.server.services import policy as policy_svc

    policy_svc.lock_draft(session)  # the draft must not start using the key meanwhile
    row = get_label_key(session, name=name)
    check_revision(row.revision, expected, f"label key {name!r}")
    used = key_usage(session).get(name, 0)
    if used:
        raise Conflict(f"label key {name!r} is used by {used} workload(s)",
                       [FieldError("path:name", f"used by {used} workload(s)")])
    keys = tuple(k for k in label_key_names(session) if k != name)
    policy_svc.check_objects_still_load(session, keys=keys,
                                        why=f"label key {name!r} is used")
    before = label_key_data(row)
    session.execute(sql_delete(Label).where(Label.key == name))
    session.delete(row)
    audit(session, actor=actor, action="label_key.delete", target=f"label_key:{name}",
          before=before)


def set_label_keys(session: Session, *, actor: Principal, keys: Sequence[str]) -> None:
    """Make the declared keys exactly `keys`, in that order (policy import). Keys to drop
    must be unused by workloads; the caller has checked the draft."""
    current = {k.name: k for k in list_label_keys(session)}
    if tuple(current) == tuple(keys):
        return
    before = [label_key_data(k) for k in current.values()]
    for name in set(current) - set(keys):
        session.execute(sql_delete(Label).where(Label.key == name))
        session.delete(current[name])
    session.flush()
    for i, name in enumerate(keys):
        if name in current:
            current[name].position = i
        else:
            session.add(LabelKey(name=name, position=i))
    session.flush()
    audit(session, actor=actor, action="label_key.set", target="label_keys",
          before={"label_keys": before}, after={"label_keys": list(keys)})


# -- labels -----------------------------------------------------------------------------------

def list_labels(session: Session, *, key: str | None = None) -> list[tuple[Label, int]]:
    q = (select(Label, func.count(WorkloadLabel.workload_id))
         .outerjoin(WorkloadLabel, WorkloadLabel.label_id == Label.id)
         .group_by(Label.id).order_by(Label.key, Label.value))
    if key is not None:
        q = q.where(Label.key == key)
    return [(lab, int(n)) for lab, n in session.execute(q)]


def _label(session: Session, key: str, value: str) -> Label | None:
    return session.scalar(select(Label).where(Label.key == key, Label.value == value))


def get_label(session: Session, *, key: str, value: str) -> tuple[Label, int]:
    row = _label(session, key, value)
    if row is None:
        raise not_found("label", f"{key}={value}", "value")
    n = session.scalar(select(func.count()).select_from(WorkloadLabel)
                       .where(WorkloadLabel.label_id == row.id)) or 0
    return row, int(n)


def label_data(row: Label) -> dict[str, Any]:
    return {"key": row.key, "value": row.value,
            **({"description": row.description} if row.description else {})}


def create_label(session: Session, *, actor: Principal, key: str, value: str,
                 description: str | None = None) -> Label:
    if session.get(LabelKey, key) is None:
        raise Invalid("undeclared label key", [FieldError("key", f"undeclared label key "
                                                                 f"{key!r}")])
    if _label(session, key, value) is not None:
        raise Conflict(f"label {key}={value} exists", [FieldError("value", "already exists")])
    row = Label(key=key, value=value, description=description)
    session.add(row)
    _flush_or_conflict(session, f"label {key}={value} exists", "value")
    audit(session, actor=actor, action="label.create", target=f"label:{key}={value}",
          after=label_data(row))
    return row


def update_label(session: Session, *, actor: Principal, key: str, value: str,
                 description: str | None, expected: Iterable[int] | None = None) -> Label:
    row, _ = get_label(session, key=key, value=value)
    check_revision(row.revision, expected, f"label {key}={value}")
    if row.description != description:
        before = label_data(row)
        row.description = description
        row.revision += 1
        audit(session, actor=actor, action="label.update", target=f"label:{key}={value}",
              before=before, after=label_data(row))
    return row


def delete_label(session: Session, *, actor: Principal, key: str, value: str,
                 expected: Iterable[int] | None = None) -> None:
    row, used = get_label(session, key=key, value=value)
    check_revision(row.revision, expected, f"label {key}={value}")
    if used:
        raise Conflict(f"label {key}={value} is used by {used} workload(s)",
                       [FieldError("path:value", f"used by {used} workload(s)")])
    audit(session, actor=actor, action="label.delete", target=f"label:{key}={value}",
          before=label_data(row))
    session.delete(row)


def _label_ids(session: Session, actor: Principal, pairs: set[tuple[str, str]]
               ) -> dict[tuple[str, str], int]:
    """Ids of the labels `pairs`, creating (and auditing) the missing ones. The insert ignores
    conflicts, so two requests creating the same label at once both succeed."""
    ids = _find_labels(session, pairs)
    missing = [{"key": k, "value": v} for k, v in sorted(pairs - set(ids))]
    if missing:
        stmt = _insert_ignore(session, Label).returning(Label.id, Label.key, Label.value)
        for i in range(0, len(missing), CHUNK):
            for lid, k, v in session.execute(stmt, missing[i:i + CHUNK]).all():
                ids[(k, v)] = lid
                audit(session, actor=actor, action="label.create", target=f"label:{k}={v}",
                      after={"key": k, "value": v}, note="created on first use by a workload")
        ids.update(_find_labels(session, pairs - set(ids)))
    return ids


def _find_labels(session: Session, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    ids: dict[tuple[str, str], int] = {}
    todo = sorted(pairs)
    for i in range(0, len(todo), CHUNK):
        q = select(Label.id, Label.key, Label.value).where(
            tuple_(Label.key, Label.value).in_(todo[i:i + CHUNK]))
        ids.update({(k, v): lid for lid, k, v in session.execute(q)})
    return ids


def _insert_ignore(session: Session, table: type[Label]) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


# -- workloads: conversion and validation ---------------------------------------------------

def to_workload(row: WorkloadRow) -> Workload:
    return Workload(row.name, tuple(row.ips), tuple(sorted(row.labels.items())), row.hostname,
                    row.managed, row.enforcement, row.os)  # type: ignore[arg-type]


def workload_file_data(w: Workload, description: str | None) -> dict[str, Any]:
    """The canonical policy-file form (defaults omitted) plus the description."""
    d: dict[str, Any] = policy_to_data(Policy(workloads=(w,)))["workloads"][0]
    if description:
        d["description"] = description
    return d


def row_file_data(row: WorkloadRow) -> dict[str, Any]:
    return workload_file_data(to_workload(row), row.description)


def workload_public(row: WorkloadRow) -> dict[str, Any]:
    return {"name": row.name, "hostname": row.hostname, "ips": list(row.ips),
            "labels": dict(sorted(row.labels.items())), "managed": row.managed,
            "enforcement": row.enforcement, "os": row.os, "description": row.description,
            "revision": row.revision, "created_at": row.created_at,
            "updated_at": row.updated_at, "updated_by": row.updated_by}


@dataclass
class Checked:
    """One workload validated on its own: the model object or the errors (request paths)."""

    workload: Workload | None
    description: str | None = None
    errors: list[FieldError] = field(default_factory=list)


def check_workload(data: dict[str, Any], keys: Sequence[str], prefix: str = "") -> Checked:
    """Validate one workload (policy-file form + description) with the file loader."""
    errors: list[FieldError] = []
    desc = data.get("description")
    if desc is not None and not isinstance(desc, str):
        errors.append(FieldError(_p(prefix, "description"), "expected a string"))
    if isinstance(data.get("hostname"), str) and len(data["hostname"]) > 255:
        errors.append(FieldError(_p(prefix, "hostname"), "at most 255 characters"))
    for k, v in (data.get("labels") or {}).items() if isinstance(data.get("labels"),
                                                                   dict) else ():
        if isinstance(v, str) and not 0 < len(v) <= 255:
            errors.append(FieldError(_p(prefix, f"labels.{k}"),
                                     "a label value has 1 to 255 characters"))
    try:
        p = policy_from_data({"label_keys": list(keys), "workloads": [data]})
    except PolicyError as exc:
        return Checked(None, None, errors + issues_to_errors(exc, "workloads[0]", prefix))
    if errors:
        return Checked(None, None, errors)
    return Checked(p.workloads[0], desc)


def _p(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and not prefix.endswith(":") else f"{prefix}{path}"


def _rows_named(session: Session, names: Iterable[str]) -> list[WorkloadRow]:
    todo = sorted(set(names))
    out: list[WorkloadRow] = []
    for i in range(0, len(todo), CHUNK):
        out.extend(session.scalars(select(WorkloadRow)
                                   .where(WorkloadRow.name.in_(todo[i:i + CHUNK]))))
    return out


def ip_owners(session: Session, ips: Iterable[str]) -> dict[str, str]:
    """address -> name of the workload that holds it (indexed lookups)."""
    todo = sorted(set(ips))
    out: dict[str, str] = {}
    for i in range(0, len(todo), CHUNK):
        q = (select(WorkloadIP.ip, WorkloadRow.name)
             .join(WorkloadRow, WorkloadRow.id == WorkloadIP.workload_id)
             .where(WorkloadIP.ip.in_(todo[i:i + CHUNK])))
        out.update({ip: name for ip, name in session.execute(q)})
    return out


def inventory_workloads(session: Session) -> tuple[Workload, ...]:
    """Every workload, in creation order (the order a policy file listed them in)."""
    rows = session.execute(select(WorkloadRow.name, WorkloadRow.ips, WorkloadRow.labels,
                                  WorkloadRow.hostname, WorkloadRow.managed,
                                  WorkloadRow.enforcement, WorkloadRow.os)
                           .order_by(WorkloadRow.id))
    return tuple(Workload(n, tuple(ips), tuple(sorted(labels.items())), h, m, e, o)
                 for n, ips, labels, h, m, e, o in rows)


def workload_descriptions(session: Session) -> dict[str, str]:
    q = select(WorkloadRow.name, WorkloadRow.description).where(
        WorkloadRow.description.is_not(None))
    return {n: d for n, d in session.execute(q) if d}


# -- workloads: writing -----------------------------------------------------------------------

@dataclass
class Change:
    row: WorkloadRow | None  # existing row, or None to create
    workload: Workload
    description: str | None


def apply_workloads(session: Session, *, actor: Principal, changes: Sequence[Change],
                    action: str = "", note: str | None = None) -> dict[str, str]:
    """Create or replace workloads (already validated, addresses already checked).

    Returns name -> created | updated | unchanged. Audits each real change."""
    status: dict[str, str] = {}
    todo: list[tuple[Change, dict[str, Any] | None, dict[str, Any]]] = []
    for ch in changes:
        after = workload_file_data(ch.workload, ch.description)
        before = row_file_data(ch.row) if ch.row is not None else None
        if before == after:
            status[ch.workload.name] = "unchanged"
        else:
            todo.append((ch, before, after))
    if not todo:
        return status
    old_ids = [ch.row.id for ch, _, _ in todo if ch.row is not None]
    for i in range(0, len(old_ids), CHUNK):  # addresses may move between workloads
        chunk = old_ids[i:i + CHUNK]
        session.execute(sql_delete(WorkloadIP).where(WorkloadIP.workload_id.in_(chunk)))
        session.execute(sql_delete(WorkloadLabel).where(WorkloadLabel.workload_id.in_(chunk)))
    label_ids = _label_ids(session, actor, {kv for ch, _, _ in todo
                                            for kv in ch.workload.labels})
    now, who = utcnow(), actor.label
    rows: list[WorkloadRow] = []
    for ch, _, _ in todo:
        w = ch.workload
        row = ch.row
        if row is None:
            row = WorkloadRow(name=w.name, revision=1, created_at=now)
            session.add(row)
        else:
            row.revision += 1
        row.hostname, row.ips, row.labels = w.hostname, list(w.ips), dict(w.labels)
        row.managed, row.enforcement, row.os = w.managed, w.enforcement, w.os
        row.description, row.updated_at, row.updated_by = ch.description, now, who
        rows.append(row)
    _flush_or_conflict(session, "a workload with that name or address was just created",
                       "name")
    ips = [{"ip": ip, "workload_id": r.id} for r in rows for ip in r.ips]
    links = [{"workload_id": r.id, "label_id": label_ids[kv]}
             for r, (ch, _, _) in zip(rows, todo, strict=True) for kv in ch.workload.labels]
    if ips:
        session.execute(insert(WorkloadIP), ips)
    if links:
        session.execute(insert(WorkloadLabel), links)
    _flush_or_conflict(session, "an address was just taken by another workload", "ips")
    for ch, before, after in todo:
        verb = "create" if before is None else "update"
        status[ch.workload.name] = "created" if before is None else "updated"
        audit(session, actor=actor, action=action or f"workload.{verb}",
              target=f"workload:{ch.workload.name}", before=before, after=after, note=note)
    return status


def _flush_or_conflict(session: Session, detail: str, path: str) -> None:
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(detail, [FieldError(path, detail)]) from None


def _address_conflicts(session: Session, w: Workload, prefix: str = "",
                       moving: set[str] | None = None) -> list[FieldError]:
    owners = ip_owners(session, w.ips)
    return [FieldError(_p(prefix, f"ips[{i}]"), f"address {ip} already belongs to {owner!r}")
            for i, ip in enumerate(w.ips)
            if (owner := owners.get(ip)) is not None and owner != w.name
            and not (moving and owner in moving)]


def get_workload(session: Session, *, name: str) -> WorkloadRow:
    row = session.scalar(select(WorkloadRow).where(WorkloadRow.name == name))
    if row is None:
        raise not_found("workload", name)
    return row


def _validated(session: Session, data: dict[str, Any]) -> Checked:
    checked = check_workload(data, label_key_names(session))
    if checked.errors or checked.workload is None:
        raise Invalid("invalid workload", checked.errors)
    conflicts = _address_conflicts(session, checked.workload)
    if conflicts:
        raise Conflict("address already in use", conflicts)
    return checked


def create_workload(session: Session, *, actor: Principal, data: dict[str, Any],
                    state: PolicyState | None = None) -> WorkloadRow:
    name = data.get("name")
    if isinstance(name, str) and session.scalar(select(WorkloadRow.id)
                                                .where(WorkloadRow.name == name)):
        raise Conflict(f"workload {name!r} exists", [FieldError("name", "already exists")])
    checked = _validated(session, data)
    assert checked.workload is not None
    apply_workloads(session, actor=actor,
                    changes=[Change(None, checked.workload, checked.description)])
    sync_workloads(session, state, [checked.workload.name])
    return get_workload(session, name=checked.workload.name)


def replace_workload(session: Session, *, actor: Principal, name: str, data: dict[str, Any],
                     expected: Iterable[int] | None = None,
                     state: PolicyState | None = None) -> WorkloadRow:
    row = get_workload(session, name=name)
    check_revision(row.revision, expected, f"workload {name!r}")
    if data.get("name", name) != name:
        raise Invalid("renaming is not supported", [FieldError(
            "name", "must equal the name in the path (delete and re-create to rename)")])
    checked = _validated(session, {**data, "name": name})
    assert checked.workload is not None
    apply_workloads(session, actor=actor, changes=[Change(row, checked.workload,
                                                          checked.description)])
    sync_workloads(session, state, [name])
    return row


def patch_workload(session: Session, *, actor: Principal, name: str, changes: dict[str, Any],
                   expected: Iterable[int] | None = None,
                   state: PolicyState | None = None) -> WorkloadRow:
    """JSON merge patch (RFC 7396): fields given replace; null removes an optional field or
    (inside `labels`) a label."""
    row = get_workload(session, name=name)
    data = row_file_data(row)
    for k, v in changes.items():
        if k == "labels" and isinstance(v, dict):
            labels = dict(data.get("labels", {}))
            for lk, lv in v.items():
                if lv is None:
                    labels.pop(lk, None)
                else:
                    labels[lk] = lv
            data["labels"] = labels
        elif v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return replace_workload(session, actor=actor, name=name, data=data, expected=expected,
                            state=state)


def delete_workload(session: Session, *, actor: Principal, name: str,
                    expected: Iterable[int] | None = None,
                    state: PolicyState | None = None) -> None:
    from bulkhead.server.services import policy as policy_svc

    policy_svc.lock_draft(session)  # the draft must not start naming it meanwhile
    row = get_workload(session, name=name)
    check_revision(row.revision, expected, f"workload {name!r}")
    refs = policy_svc.workload_references(session, {name})
    if refs:
        raise Conflict(f"workload {name!r} is named by the policy",
                       [FieldError(p, f"names workload {name!r}") for p in refs])
    before = row_file_data(row)
    session.delete(row)
    session.flush()
    audit(session, actor=actor, action="workload.delete", target=f"workload:{name}",
          before=before)
    sync_workloads(session, state, [name])


def delete_workloads(session: Session, *, actor: Principal, rows: Sequence[WorkloadRow],
                     note: str | None = None) -> None:
    for row in rows:
        audit(session, actor=actor, action="workload.delete", target=f"workload:{row.name}",
              before=row_file_data(row), note=note)
        session.delete(row)
    session.flush()


def _conditions(labels: Sequence[tuple[str, Sequence[str]]] = (), name: str | None = None,
                ip: str | None = None, managed: bool | None = None,
                enforcement: str | None = None) -> list[Any]:
    conds: list[Any] = []
    for key, values in labels:
        sub = (select(WorkloadLabel.workload_id)
               .join(Label, Label.id == WorkloadLabel.label_id)
               .where(Label.key == key, Label.value.in_(list(values))))
        conds.append(WorkloadRow.id.in_(sub))
    if name:
        esc = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(or_(WorkloadRow.name.ilike(f"%{esc}%", escape="\\"),
                         WorkloadRow.hostname.ilike(f"%{esc}%", escape="\\")))
    if ip:
        conds.append(WorkloadRow.id.in_(select(WorkloadIP.workload_id)
                                        .where(WorkloadIP.ip == ip)))
    if managed is not None:
        conds.append(WorkloadRow.managed.is_(managed))
    if enforcement is not None:
        conds.append(WorkloadRow.enforcement == enforcement)
    return conds


def list_workloads(session: Session, *, labels: Sequence[tuple[str, Sequence[str]]] = (),
                   name: str | None = None, ip: str | None = None,
                   managed: bool | None = None, enforcement: str | None = None,
                   limit: int = 100, offset: int = 0, cursor: str | None = None
                   ) -> tuple[list[WorkloadRow], int, str | None]:
    """A page of workloads in name order, the total matching, and the next cursor (keyset
    pagination on the name; `offset` is used only without a cursor)."""
    conds = _conditions(labels, name, ip, managed, enforcement)
    total = session.scalar(select(func.count()).select_from(WorkloadRow).where(*conds)) or 0
    q = select(WorkloadRow).where(*conds).order_by(WorkloadRow.name)
    q = q.where(WorkloadRow.name > cursor) if cursor is not None else q.offset(offset)
    rows = list(session.scalars(q.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, int(total), (rows[-1].name if more and rows else None)


# -- bulk: enforcement, import ------------------------------------------------------------------

def set_enforcement(session: Session, *, actor: Principal, enforcement: str,
                    names: Sequence[str] | None = None,
                    selector: dict[str, str | list[str]] | None = None,
                    state: PolicyState | None = None) -> tuple[int, list[str]]:
    """Set the enforcement state of the named and/or label-selected workloads (all or
    nothing). Returns (how many matched, names changed)."""
    if enforcement not in ENFORCEMENT_STATES:
        raise Invalid("invalid enforcement", [FieldError("enforcement", "expected one of "
                                                         + ", ".join(ENFORCEMENT_STATES))])
    if names is None and selector is None:
        raise Invalid("select workloads", [FieldError(
            "names", "give names and/or labels (labels: {} selects every workload)")])
    rows: dict[str, WorkloadRow] = {}
    if names is not None:
        found = {r.name: r for r in _rows_named(session, names)}
        missing = [FieldError(f"names[{i}]", f"no workload {n!r}")
                   for i, n in enumerate(names) if n not in found]
        if missing:
            raise Invalid("unknown workloads", missing)
        rows.update(found)
    if selector is not None:
        keys = set(label_key_names(session))
        bad = [FieldError(f"labels.{k}", f"undeclared label key {k!r}")
               for k in selector if k not in keys]
        if bad:
            raise Invalid("invalid selector", bad)
        terms = [(k, [v] if isinstance(v, str) else list(v)) for k, v in selector.items()]
        q = select(WorkloadRow).where(*_conditions(terms))
        rows.update({r.name: r for r in session.scalars(q)})
    changes = [Change(r, _with_enforcement(to_workload(r), enforcement), r.description)
               for r in rows.values() if r.enforcement != enforcement]
    status = apply_workloads(session, actor=actor, changes=changes,
                             note=f"bulk enforcement: {enforcement}")
    changed = sorted(n for n, s in status.items() if s == "updated")
    sync_workloads(session, state, changed)
    return len(rows), changed


def _with_enforcement(w: Workload, enforcement: str) -> Workload:
    from dataclasses import replace

    return replace(w, enforcement=enforcement)  # type: ignore[arg-type]


TRUE = {"true", "yes", "1", "y", "on"}
FALSE = {"false", "no", "0", "n", "off", ""}


@dataclass
class ImportRow:
    locator: str  # "line 3" (CSV) or "[2]" (JSON)
    line: int | None
    index: int
    data: dict[str, Any]
    errors: list[FieldError] = field(default_factory=list)
    # fields the input gives (CSV: the header; `labels.KEY` for a label column): an existing
    # workload keeps the fields the input does not mention
    present: set[str] = field(default_factory=set)

    def merged(self, current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None:
            return self.data
        out = dict(current)
        labels = dict(out.get("labels", {}))
        raw = self.data.get("labels")
        given: dict[str, Any] = raw if isinstance(raw, dict) else {}
        for f in sorted(self.present):
            if f == "labels":
                labels = dict(given)
            elif f.startswith("labels."):
                k = f.removeprefix("labels.")
                if k in given:
                    labels[k] = given[k]
                else:
                    labels.pop(k, None)
            elif f in self.data:
                out[f] = self.data[f]
            else:
                out.pop(f, None)
        out["labels"] = labels
        if not isinstance(self.data.get("labels", {}), dict):
            out["labels"] = self.data["labels"]  # let the loader name the error
        return out


def parse_csv(text: str, keys: Sequence[str]) -> list[ImportRow]:
    """CSV with a header: name, hostname, ips (separated by ; or spaces), managed, enforcement,
    os, description, one column per label key (or a `labels` column `k=v;k=v`)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise Invalid("empty CSV", [FieldError("line 1", "missing header row")]) from None
    known = set(WORKLOAD_FIELDS) | set(keys)
    errors = [FieldError(f"line 1.{h or i}", f"unknown column {h!r} (expected: "
                         f"{', '.join(WORKLOAD_FIELDS)} or a label key: {', '.join(keys)})")
              for i, h in enumerate(header) if h not in known]
    errors += [FieldError(f"line 1.{h}", "column repeats") for i, h in enumerate(header)
               if h in header[:i]]
    if "name" not in header:
        errors.append(FieldError("line 1", "missing column 'name'"))
    if errors:
        raise Invalid("invalid CSV header", errors)
    rows: list[ImportRow] = []
    present = {f"labels.{h}" if h in keys else h for h in header}
    line = reader.line_num
    for index, cells in enumerate(reader):
        start, line = line + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        loc = f"line {start}"
        row = ImportRow(loc, start, index, {}, present=present)
        if len(cells) != len(header):
            row.errors.append(FieldError(loc, f"{len(cells)} cells, header has {len(header)}"))
            rows.append(row)
            continue
        labels: dict[str, str] = {}
        for h, cell in zip(header, cells, strict=True):
            cell = cell.strip()
            if h == "ips":
                row.data["ips"] = [p for p in cell.replace(";", " ").replace(",", " ").split()]
            elif h == "labels":
                for part in filter(None, (p.strip() for p in cell.split(";"))):
                    k, sep, v = part.partition("=")
                    if not sep:
                        row.errors.append(FieldError(f"{loc}.labels", f"expected key=value, "
                                                                      f"got {part!r}"))
                    else:
                        labels[k.strip()] = v.strip()
            elif h == "managed":
                if cell.lower() not in TRUE | FALSE:
                    row.errors.append(FieldError(f"{loc}.managed",
                                                 f"expected true or false, got {cell!r}"))
                row.data["managed"] = cell.lower() in TRUE
            elif h in keys:
                if cell:
                    labels[h] = cell
            elif cell:
                row.data[h] = cell
        if labels:
            row.data["labels"] = labels
        rows.append(row)
    return rows


def json_rows(data: Any) -> list[ImportRow]:
    items = data.get("workloads") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"workloads"}:
        raise Invalid("unknown fields", [FieldError(k, "unknown field (expected 'workloads')")
                                         for k in data if k != "workloads"])
    if not isinstance(items, list):
        raise Invalid("expected a list of workloads", [FieldError(
            "", "expected a JSON list of workloads or {\"workloads\": [...]}")])
    rows = []
    for i, item in enumerate(items):
        row = ImportRow(f"[{i}]", None, i, item if isinstance(item, dict) else {},
                        present=set(item) if isinstance(item, dict) else set())
        if not isinstance(item, dict):
            row.errors.append(FieldError(f"[{i}]", "expected a workload object"))
        rows.append(row)
    return rows


def import_workloads(session: Session, *, actor: Principal, rows: list[ImportRow],
                     best_effort: bool = False, dry_run: bool = False,
                     state: PolicyState | None = None) -> dict[str, Any]:
    """Create or update workloads from rows. All-or-nothing unless `best_effort` (then the good
    rows are applied and the bad ones reported). Returns a per-row report."""
    keys = label_key_names(session)
    existing = {r.name: r for r in _rows_named(
        session, [r.data["name"] for r in rows if isinstance(r.data.get("name"), str)])}
    checked: dict[int, Checked] = {}
    for r in rows:
        if r.errors:
            continue
        cur = existing.get(r.data.get("name"))  # type: ignore[arg-type]
        c = check_workload(r.merged(row_file_data(cur) if cur else None), keys, r.locator)
        r.errors.extend(c.errors)
        if not c.errors:
            checked[r.index] = c
    _check_batch(session, rows, checked)
    good = [r for r in rows if not r.errors]
    bad = [r for r in rows if r.errors]
    if bad and not best_effort:
        raise Invalid(f"{len(bad)} of {len(rows)} rows are invalid; nothing was imported",
                      [e for r in bad for e in r.errors])
    status: dict[str, str] = {}
    if good and not dry_run:
        status = apply_workloads(session, actor=actor, changes=[
            Change(existing.get(c.workload.name), c.workload, c.description)
            for c in (checked[r.index] for r in good) if c.workload is not None],
            note="workload import")
        sync_workloads(session, state, [n for n, s in status.items() if s != "unchanged"])
    report_rows = []
    for r in rows:
        name = r.data.get("name") if isinstance(r.data.get("name"), str) else None
        if r.errors:
            st = "error"
        elif dry_run:
            st = "would_update" if name in existing else "would_create"
        else:
            st = status.get(name or "", "unchanged")
        report_rows.append({"line": r.line, "index": r.index, "name": name, "status": st,
                            "errors": [{"path": e.path, "message": e.message}
                                       for e in r.errors]})
    summary: dict[str, int] = {}
    for rr in report_rows:
        summary[str(rr["status"])] = summary.get(str(rr["status"]), 0) + 1
    return {"mode": "best_effort" if best_effort else "atomic", "dry_run": dry_run,
            "applied": bool(good) and not dry_run, "rows_total": len(rows),
            "summary": summary, "rows": report_rows}


def _check_batch(session: Session, rows: list[ImportRow], checked: dict[int, Checked]) -> None:
    """Names and addresses unique within the batch and against other workloads."""
    seen_name: dict[str, str] = {}
    seen_ip: dict[str, str] = {}
    for r in rows:
        c = checked.get(r.index)
        if c is None or c.workload is None:
            continue
        w = c.workload
        if w.name in seen_name:
            r.errors.append(FieldError(_p(r.locator, "name"),
                                       f"workload {w.name!r} repeats ({seen_name[w.name]})"))
            continue
        seen_name[w.name] = r.locator
        for i, ip in enumerate(w.ips):
            if ip in seen_ip:
                r.errors.append(FieldError(_p(r.locator, f"ips[{i}]"),
                                           f"address {ip} also in {seen_ip[ip]}"))
            else:
                seen_ip[ip] = f"{r.locator} ({w.name})"
    owners = ip_owners(session, seen_ip)
    for r in rows:
        c = checked.get(r.index)
        if r.errors or c is None or c.workload is None:
            continue
        w = c.workload
        for i, ip in enumerate(w.ips):
            owner = owners.get(ip)
            if owner is not None and owner != w.name and owner not in seen_name:
                r.errors.append(FieldError(_p(r.locator, f"ips[{i}]"),
                                           f"address {ip} already belongs to {owner!r}"))
