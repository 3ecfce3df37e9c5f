"""Policy versions: changes and semantic diff, lint and provision, the compiled state,
revert, import, export.

`provision` takes the draft lock (`services.policy.lock_draft`) and copies the draft's objects
into an immutable version after a full load (with every workload) and lint; the active policy
is the latest version's objects plus the current inventory.

The compiled `PolicyState` is reloaded only after a provision commits (see
`inventory.after_commit`), by re-reading the latest version under `inventory.SYNC_LOCK`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import yaml
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Policy
from bulkhead.policy.fileformat import policy_from_document, policy_to_data
from bulkhead.policy.source import parse_text
from bulkhead.server import metrics
from bulkhead.server.auth import Principal
from bulkhead.server.db import utcnow
from bulkhead.server.errors import Conflict, FieldError, Invalid
from bulkhead.server.models.policy import DraftObject, PolicyDraft, PolicyVersion, WorkloadRow
from bulkhead.server.policystate import PolicyState
from bulkhead.server.services import inventory as inv
from bulkhead.server.services.audit import audit, emit
from bulkhead.server.services.policy import (
    DESCRIBED,
    LIST_KINDS,
    SINGLETONS,
    SINGULAR,
    Doc,
    _bump,
    _check_scope,
    _errors,
    _forbid,
    _list,
    _require_unscoped,
    _restricted,
    active_version,
    assemble,
    draft_doc,
    draft_revision,
    draft_rows,
    ensure_store,
    lock_draft,
    objects_doc,
    validate_objects,
    workload_references,
)

log = logging.getLogger(__name__)

SUMMARY_MAX_BYTES = 256 * 1024
SUMMARY_SAMPLE = 100  # changes kept per list when the semantic summary is too large
# Above this many workloads provision stores no semantic summary: the diff's output (and time)
# can grow with workload pairs; GET /policy/diff computes it on demand.
SEMANTIC_SUMMARY_MAX_WORKLOADS = 1000


# -- versions, changes, diff --------------------------------------------------------------------


def list_versions(session: Session, *, limit: int = 50, offset: int = 0
                  ) -> tuple[list[PolicyVersion], int]:
    total = session.scalar(select(func.count()).select_from(PolicyVersion)) or 0
    rows = session.scalars(select(PolicyVersion).options(defer(PolicyVersion.objects))
                           .order_by(PolicyVersion.id.desc()).offset(offset).limit(limit))
    return list(rows), int(total)


def get_version(session: Session, *, version: int, param: str = "version_id"
                ) -> PolicyVersion:
    row = session.get(PolicyVersion, version) if 0 < version < 2**31 else None
    if row is None:
        raise inv.not_found("policy version", str(version), param)
    return row


def object_changes(old: Doc, new: Doc) -> dict[str, Any]:
    """Objects added, modified, deleted from `old` to `new`; kinds whose order changed."""
    added: list[dict[str, str]] = []
    modified: list[dict[str, str]] = []
    deleted: list[dict[str, str]] = []
    reordered: list[str] = []
    for kind in LIST_KINDS:
        a = {b["name"]: b for b in old.get(kind, [])}
        b = {x["name"]: x for x in new.get(kind, [])}
        kn = SINGULAR[kind]
        added += [{"kind": kn, "name": n} for n in b if n not in a]
        deleted += [{"kind": kn, "name": n} for n in a if n not in b]
        modified += [{"kind": kn, "name": n} for n in b if n in a and a[n] != b[n]]
        if [n for n in a if n in b] != [n for n in b if n in a]:
            reordered.append(kn)
    for kind in SINGLETONS:
        if (old.get(kind) or None) != (new.get(kind) or None):
            modified.append({"kind": SINGULAR[kind], "name": kind})
    return {"added": added, "modified": modified, "deleted": deleted, "reordered": reordered}


def has_changes(changes: dict[str, Any]) -> bool:
    return any(changes[k] for k in ("added", "modified", "deleted", "reordered"))


def _doc_for(session: Session, ref: str, param: str) -> tuple[Doc, str]:
    if ref == "draft":
        return draft_doc(session), "draft"
    if ref == "active":
        v = active_version(session)
        return (v.objects, f"active (version {v.id})") if v else ({}, "active (none)")
    if (ref.isascii() and ref.isdigit()):
        v = get_version(session, version=int(ref), param=param)
        return v.objects, f"version {v.id}"
    raise Invalid("invalid policy reference", [FieldError(
        f"query:{param}", "expected a version number, 'active' or 'draft'")])


def _assemble_ref(session: Session, doc: Doc, label: str) -> Policy:
    try:
        return assemble(session, doc)
    except PolicyError as exc:
        raise Conflict(f"{label} no longer loads against the current inventory",
                       _errors(exc, doc, None, f"{label}:")) from None


def draft_changes(session: Session) -> dict[str, Any]:
    active = active_version(session)
    rows = draft_rows(session)
    changes = object_changes(active.objects if active else {}, objects_doc(rows))
    meta = {(SINGULAR[r.kind], r.name): r for r in rows}
    for entry in changes["added"] + changes["modified"]:
        r = meta.get((entry["kind"], entry["name"]))
        if r is not None:
            entry.update(updated_at=r.updated_at.isoformat(), updated_by=r.updated_by)
    return {"base_version": active.id if active else None,
            "draft_revision": draft_revision(session), **changes}


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def semantic_diff(old: Policy, new: Policy) -> Any:
    """`bulkhead.policy.diff.diff(old, new).to_data()`, or None when that module is absent."""
    mod = _module("bulkhead.policy.diff")
    if mod is None:
        return None
    return _jsonable(mod.diff(old, new).to_data())


def diff_policies(session: Session, *, from_: str, to: str) -> dict[str, Any]:
    old_doc, old_label = _doc_for(session, from_, "from")
    new_doc, new_label = _doc_for(session, to, "to")
    out: dict[str, Any] = {"from": old_label, "to": new_label,
                           "changes": object_changes(old_doc, new_doc)}
    if _module("bulkhead.policy.diff") is None:
        out["semantic"] = None
        out["semantic_unavailable"] = "bulkhead.policy.diff is not installed in this build"
        return out
    out["semantic"] = semantic_diff(_assemble_ref(session, old_doc, old_label),
                                    _assemble_ref(session, new_doc, new_label))
    return out


# -- lint and provision -------------------------------------------------------------------------

def _finding(f: Any) -> dict[str, Any]:
    sev = getattr(f, "severity", None) or getattr(f, "level", None) or ""
    sev = str(getattr(sev, "value", sev)).lower()
    return {"path": str(getattr(f, "path", "") or ""), "severity": sev,
            "message": str(getattr(f, "message", None) or f),
            **({"code": str(f.code)} if getattr(f, "code", None) else {})}


def lint_policy(policy: Policy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(errors, other findings) from `bulkhead.policy.lint`; ([], []) if it is absent."""
    mod = _module("bulkhead.policy.lint")
    if mod is None:
        log.warning("bulkhead.policy.lint is not available: provisioning without lint")
        return [], []
    findings = list(mod.lint(policy))
    items = [_finding(f) for f in findings]
    if not mod.has_errors(findings):
        return [], items
    errors = [i for i in items if i["severity"] == "error"] or items
    return errors, [i for i in items if i not in errors]


def provision(session: Session, *, actor: Principal, note: str, force: bool = False,
              expected: Iterable[int] | None = None, state: PolicyState | None = None
              ) -> tuple[PolicyVersion, list[dict[str, Any]]]:
    """Snapshot the draft into a new immutable version; returns it and lint warnings."""
    draft = lock_draft(session)
    inv.check_revision(draft.revision, expected, "the draft")
    rows = draft_rows(session)
    doc = objects_doc(rows)
    prev = active_version(session)
    prev_doc = prev.objects if prev else {}
    changes = object_changes(prev_doc, doc)
    if not force and not has_changes(changes):
        raise Conflict("nothing to provision: the draft equals the active policy",
                       [FieldError("force", "set force: true to provision anyway")])
    if _restricted(actor) is not None:
        _check_scoped_provision(actor, changes, prev_doc, doc)
    try:
        policy = assemble(session, doc)
    except PolicyError as exc:
        raise Invalid("the draft does not load; nothing was provisioned",
                      _errors(exc, doc, None)) from None
    errors, warnings = lint_policy(policy)
    if errors:
        raise Invalid(f"the draft has {len(errors)} lint error(s); nothing was provisioned",
                      [FieldError(e["path"], e["message"]) for e in errors])
    summary = {"changes": changes, "counts": {k: len(v) for k, v in changes.items()},
               "lint_warnings": len(warnings)}
    summary.update(_semantic_summary(session, prev_doc, policy))
    vid = (prev.id if prev else 0) + 1
    version = PolicyVersion(id=vid, created_at=utcnow(), author=actor.label, note=note,
                            objects=doc, summary=summary, draft_revision=draft.revision)
    session.add(version)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict("another provision happened at the same time; retry",
                       [FieldError("", "version number taken")]) from None
    audit(session, actor=actor, action="policy.provision", target=f"policy_version:{vid}",
          before=prev_doc, after=doc, note=note)
    emit(session, kind="provisioned", subject=f"policy_version:{vid}",
         data={"version": vid, "note": note, "author": actor.label,
               "counts": summary["counts"]})
    _sync_active(session, state)
    return version, warnings


def _semantic_summary(session: Session, prev_doc: Doc, new: Policy) -> dict[str, Any]:
    if _module("bulkhead.policy.diff") is None:
        return {"semantic_skipped": "bulkhead.policy.diff is not installed"}
    if len(new.workloads) > SEMANTIC_SUMMARY_MAX_WORKLOADS:
        return {"semantic_skipped": f"{len(new.workloads)} workloads (more than "
                                    f"{SEMANTIC_SUMMARY_MAX_WORKLOADS}): see GET /policy/diff"}
    try:
        sem = semantic_diff(assemble(session, prev_doc), new)
    except Exception as exc:  # a summary must not block a provision that passed every check
        log.exception("semantic diff for the provision summary failed")
        return {"semantic_error": str(exc)}
    if not isinstance(sem, dict):
        return {"semantic": sem}
    counts = {k: len(v) for k, v in sem.items() if isinstance(v, list)}
    if len(json.dumps(sem)) > SUMMARY_MAX_BYTES:  # keep a sample; GET /policy/diff has all
        sem = {k: v[:SUMMARY_SAMPLE] if isinstance(v, list) else v for k, v in sem.items()}
        sem["truncated"] = True
    return {"semantic_counts": counts, "semantic": sem}


def _check_scoped_provision(actor: Principal, changes: dict[str, Any], old: Doc,
                            new: Doc) -> None:
    allowed = _restricted(actor)
    assert allowed is not None
    others = [c for k in ("added", "modified", "deleted") for c in changes[k]
              if c["kind"] != "ruleset"] + [{"kind": k, "name": "(order)"}
                                            for k in changes["reordered"] if k != "ruleset"]
    if others:
        raise _forbid("the draft has changes outside your scope: " + ", ".join(
            f"{c['kind']} {c['name']!r}" for c in others))
    olds = {b["name"]: b for b in old.get("rulesets", [])}
    news = {b["name"]: b for b in new.get("rulesets", [])}
    for k in ("added", "modified", "deleted"):
        for c in changes[k]:
            _check_scope(actor, [olds.get(c["name"]), news.get(c["name"])], new)


# -- compiled state -----------------------------------------------------------------------------

def load_active(session: Session, state: PolicyState) -> None:
    """Load the latest version + inventory into `state` (caller holds inv.SYNC_LOCK)."""
    v = active_version(session)
    try:
        policy = assemble(session, v.objects if v else {})
    except PolicyError as exc:  # keep the last good compiled state; agents keep theirs
        log.error("active policy version %s does not load: %s", v.id if v else None, exc)
        return
    state.load(v.id if v else None, policy)
    metrics.POLICY_VERSION.set(v.id if v else 0)


def _sync_active(session: Session, state: PolicyState | None) -> None:
    if state is None:
        return
    engine = session.get_bind()
    assert isinstance(engine, Engine)

    def run() -> None:
        with inv.SYNC_LOCK, Session(engine) as s:
            load_active(s, state)

    inv.after_commit(session, run)


def rebuild_state(session: Session, state: PolicyState) -> None:
    """At start-up (app.py): make sure the store is initialised, then load the active policy."""
    if not inspect(session.get_bind()).has_table(PolicyDraft.__tablename__):
        log.warning("policy tables are missing (database not migrated?): policy state empty")
        return
    ensure_store(session)
    with inv.SYNC_LOCK:
        load_active(session, state)


# -- revert, import, export ---------------------------------------------------------------------

def _replace_draft(session: Session, *, actor: Principal, draft: PolicyDraft,
                   new: Doc) -> dict[str, Any]:
    """Make the draft's objects exactly `new` (canonical bodies); unchanged rows keep their
    revision. Returns the object changes."""
    rows = draft_rows(session)
    old = objects_doc(rows)
    by_key = {(r.kind, r.name): r for r in rows}
    seen: set[tuple[str, str]] = set()
    now = utcnow()
    wanted: list[tuple[str, str, int, Any]] = [
        (kind, body["name"], pos, body) for kind in LIST_KINDS
        for pos, body in enumerate(new.get(kind, []))]
    wanted += [(kind, kind, 0, new[kind]) for kind in SINGLETONS if new.get(kind)]
    for kind, name, pos, body in wanted:
        seen.add((kind, name))
        row = by_key.get((kind, name))
        if row is None:
            session.add(DraftObject(kind=kind, name=name, position=pos, body=body, revision=1,
                                    updated_at=now, updated_by=actor.label))
        elif row.body != body or row.position != pos:
            row.body, row.position = body, pos
            row.revision += 1
            row.updated_at, row.updated_by = now, actor.label
    for key, row in by_key.items():
        if key not in seen:
            session.delete(row)
    changes = object_changes(old, new)
    if has_changes(changes):
        _bump(draft, actor)
    session.flush()
    return changes


def revert(session: Session, *, actor: Principal, version: int,
           expected: Iterable[int] | None = None) -> dict[str, Any]:
    """Set the draft's objects to those of `version` (does not provision)."""
    _require_unscoped(actor, "the whole draft (revert)")
    draft = lock_draft(session)
    inv.check_revision(draft.revision, expected, "the draft")
    v = get_version(session, version=version, param="version")
    try:
        validate_objects(session, v.objects)
    except PolicyError as exc:
        raise Conflict(f"version {version} no longer loads against the current inventory",
                       _errors(exc, v.objects, None)) from None
    before = draft_doc(session)
    changes = _replace_draft(session, actor=actor, draft=draft, new=v.objects)
    audit(session, actor=actor, action="policy.revert", target="policy:draft",
          before=before, after=v.objects, note=f"revert to version {version}")
    return {"version": version, "draft_revision": draft.revision, "changes": changes}


def _canonical_doc(p: Policy, raw: Any) -> Doc:
    """The objects of a loaded file in canonical form, descriptions kept."""
    data = policy_to_data(p)
    doc: Doc = {}
    for kind in LIST_KINDS:
        if data.get(kind):
            doc[kind] = data[kind]
            if kind in DESCRIBED:
                for body, src in zip(doc[kind], _list(raw.get(kind)), strict=True):
                    if isinstance(src, dict) and isinstance(src.get("description"), str) \
                            and src["description"]:
                        body["description"] = src["description"]
    for kind in SINGLETONS:
        if data.get(kind):
            doc[kind] = data[kind]
    return doc


def import_policy(session: Session, *, actor: Principal, text: str, workloads: str = "upsert",
                  expected: Iterable[int] | None = None, state: PolicyState | None = None
                  ) -> dict[str, Any]:
    """Replace the draft's objects and the label keys with a policy file's, and create/update
    its workloads (`workloads`: upsert | replace | skip). All or nothing."""
    try:
        src = parse_text(text)
        p = policy_from_document(src)
    except PolicyError as exc:
        raise Invalid("the policy file is invalid; nothing was imported",
                      inv.issues_to_errors(exc)) from None
    _require_unscoped(actor, "the whole policy (import)")
    raw = src.data if isinstance(src.data, dict) else {}
    if p.workloads and workloads != "skip" and not actor.can("inventory:write"):
        raise _forbid(f"{actor.label} lacks permission 'inventory:write' to import workloads "
                      "(use workloads=skip)", "query:workloads")
    draft = lock_draft(session)
    inv.check_revision(draft.revision, expected, "the draft")
    new_doc = _canonical_doc(p, raw)
    keys = p.label_keys
    existing = {r.name: r for r in session.scalars(select(WorkloadRow))}
    file_names = {w.name for w in p.workloads} if workloads != "skip" else set()
    remaining = [r for n, r in existing.items() if n not in file_names]
    doomed = remaining if workloads == "replace" else []
    kept = [] if workloads == "replace" else remaining
    errors: list[FieldError] = []
    for r in kept:
        bad = sorted(set(r.labels) - set(keys))
        if bad:
            errors.append(FieldError("label_keys", f"workload {r.name!r} (not in the file) "
                                     f"uses label key(s) {', '.join(bad)}"))
    if workloads == "skip":
        try:
            validate_objects(session, new_doc, keys)
        except PolicyError as exc:
            errors += _errors(exc, new_doc, None)
    else:
        kept_ips = {ip: r.name for r in kept for ip in r.ips}
        for i, w in enumerate(p.workloads):
            errors += [FieldError(f"workloads[{i}].ips[{j}]",
                                  f"address {ip} already belongs to {kept_ips[ip]!r} "
                                  "(not in the file)")
                       for j, ip in enumerate(w.ips) if ip in kept_ips]
    if doomed:
        refs = [p_ for p_ in workload_references(session, {r.name for r in doomed})
                if not p_.startswith("draft:")]
        errors += [FieldError(r, "names a workload that workloads=replace would delete")
                   for r in refs]
    active = active_version(session)
    if active is not None:
        try:
            validate_objects(session, active.objects, keys)
        except PolicyError as exc:
            errors += _errors(exc, active.objects, None, f"version {active.id}:")
    if errors:
        raise Conflict("the policy file conflicts with the inventory or the active version; "
                       "nothing was imported", errors)
    before = draft_doc(session)
    current_keys = inv.label_key_names(session)
    if set(keys) - set(current_keys):
        inv.set_label_keys(session, actor=actor,
                           keys=[*current_keys, *(k for k in keys if k not in current_keys)])
    status: dict[str, str] = {}
    if doomed:
        inv.delete_workloads(session, actor=actor, rows=doomed, note="policy import (replace)")
        status.update({r.name: "deleted" for r in doomed})
    if workloads != "skip":
        descs = [src.get("description") if isinstance(src, dict) else None
                 for src in _list(raw.get("workloads"))]
        status.update(inv.apply_workloads(session, actor=actor, changes=[
            inv.Change(existing.get(w.name), w, d if isinstance(d, str) and d else None)
            for w, d in zip(p.workloads, descs, strict=True)], note="policy import"))
    inv.set_label_keys(session, actor=actor, keys=keys)
    changes = _replace_draft(session, actor=actor, draft=draft, new=new_doc)
    audit(session, actor=actor, action="policy.import", target="policy:draft", before=before,
          after=new_doc, note=f"workloads={workloads}")
    inv.sync_workloads(session, state, [n for n, s in status.items() if s != "unchanged"])
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    return {"draft_revision": draft.revision, "changes": changes, "workloads": counts,
            "label_keys": list(keys)}


def export_data(session: Session, *, ref: str = "draft", workloads: bool = True
                ) -> tuple[dict[str, Any], str]:
    """A policy file (plain data) of `ref` (draft | active | version number) with the current
    inventory; `load(export) == the assembled Policy`."""
    doc, label = _doc_for(session, ref, "version")
    p = _assemble_ref(session, doc, label)
    if not workloads:
        p = replace(p, workloads=())
    data = policy_to_data(p)
    for kind in DESCRIBED:
        for body, src in zip(data.get(kind, []), doc.get(kind, []), strict=False):
            if src.get("description"):
                body["description"] = src["description"]
    if workloads and data.get("workloads"):
        descs = inv.workload_descriptions(session)
        for w in data["workloads"]:
            if w["name"] in descs:
                w["description"] = descs[w["name"]]
    return data, label


# libyaml when present: byte-identical output (checked in the tests), about 4x faster.
class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v))


def render(data: dict[str, Any], fmt: str) -> str:
    """Deterministic text, in the same style as `bulkhead.policy.fileformat.dump_policy`."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)
