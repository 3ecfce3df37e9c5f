"""Policy use cases: the draft's objects, provision, versions, diff, revert, import/export.

Theory of operation. The draft is a set of rows (`DraftObject`), one per policy object, each
body in the policy-file form. Every edit assembles the draft's objects into a policy document,
applies the change and validates the result with the policy-file loader
(`policy_from_data`): one format, one set of rules and messages for the API, the file and the
console. Workloads are live inventory; for this validation the document carries only stubs
(`{name}`) of the workloads the policy names, so an edit costs O(draft), not O(inventory).

Every draft mutation first takes the draft lock (an UPDATE of the one `policy_draft` row: a
row lock on PostgreSQL, the writer lock on SQLite) and only then reads, so two concurrent
edits validate one after the other and the draft is always loadable. `provision` copies the
draft's objects into an immutable version after a full load (with every workload) and lint;
the active policy is the latest version's objects plus the current inventory.

The compiled `PolicyState` is reloaded only after a provision commits (see
`inventory.after_commit`), by re-reading the latest version under `inventory.SYNC_LOCK`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import yaml
from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Policy
from bulkhead.policy.fileformat import policy_from_data, policy_from_document, policy_to_data
from bulkhead.policy.source import parse_text
from bulkhead.server import metrics
from bulkhead.server.auth import Principal
from bulkhead.server.db import utcnow
from bulkhead.server.errors import Conflict, FieldError, Forbidden, Invalid
from bulkhead.server.models.policy import DraftObject, PolicyDraft, PolicyVersion, WorkloadRow
from bulkhead.server.policystate import PolicyState
from bulkhead.server.services import inventory as inv
from bulkhead.server.services.audit import audit, emit

log = logging.getLogger(__name__)

LIST_KINDS = ("label_groups", "ip_lists", "services", "user_groups", "rulesets")
SINGLETONS = ("settings", "tests")
SINGULAR = {"label_groups": "label_group", "ip_lists": "ip_list", "services": "service",
            "user_groups": "user_group", "rulesets": "ruleset", "settings": "settings",
            "tests": "policy_tests"}
WHAT = {"label_groups": "label group", "ip_lists": "IP list", "services": "service",
        "user_groups": "user group", "rulesets": "ruleset", "settings": "settings",
        "tests": "policy tests"}
# The file accepts a description on these, the model drops it: the draft keeps it.
DESCRIBED = ("label_groups", "ip_lists", "services", "user_groups")
SUMMARY_MAX_BYTES = 256 * 1024
SUMMARY_SAMPLE = 100  # changes kept per list when the semantic summary is too large
# Above this many workloads provision stores no semantic summary: the diff's output (and time)
# can grow with workload pairs; GET /policy/diff computes it on demand.
SEMANTIC_SUMMARY_MAX_WORKLOADS = 1000
Doc = dict[str, Any]


# -- the draft row and its lock -------------------------------------------------------------

def ensure_store(session: Session) -> PolicyDraft:
    draft = session.get(PolicyDraft, 1)
    if draft is None:
        draft = PolicyDraft(id=1, revision=0)
        session.add(draft)
        inv.ensure_label_keys(session)
        session.flush()
    return draft


def lock_draft(session: Session) -> PolicyDraft:
    """Serialise with every other draft mutation and provision; then read the draft row."""
    res = session.execute(update(PolicyDraft).where(PolicyDraft.id == 1)
                          .values(updated_at=PolicyDraft.updated_at))
    if not getattr(res, "rowcount", 1):
        return ensure_store(session)
    draft = session.get(PolicyDraft, 1, populate_existing=True)
    assert draft is not None
    return draft


def _bump(draft: PolicyDraft, actor: Principal) -> None:
    draft.revision += 1
    draft.updated_at = utcnow()
    draft.updated_by = actor.label


def draft_revision(session: Session) -> int:
    return int(session.scalar(select(PolicyDraft.revision).where(PolicyDraft.id == 1)) or 0)


def draft_rows(session: Session) -> list[DraftObject]:
    return list(session.scalars(select(DraftObject)
                                .order_by(DraftObject.kind, DraftObject.position)))


def objects_doc(rows: Iterable[DraftObject]) -> Doc:
    """The policy objects as a policy-file document (no version, label keys, workloads)."""
    by_kind: dict[str, list[DraftObject]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    doc: Doc = {}
    for kind in LIST_KINDS:
        items = sorted(by_kind.get(kind, []), key=lambda r: r.position)
        if items:
            doc[kind] = [r.body for r in items]
    for kind in SINGLETONS:
        for r in by_kind.get(kind, []):
            if r.body:
                doc[kind] = r.body
    return doc


def draft_doc(session: Session) -> Doc:
    return objects_doc(draft_rows(session))


# -- validation -------------------------------------------------------------------------------

def _actors(doc: Doc) -> Iterator[tuple[str, Any]]:
    for i, rs in enumerate(_list(doc.get("rulesets"))):
        for j, rule in enumerate(_list(rs.get("rules") if isinstance(rs, dict) else None)):
            for side in ("consumers", "providers"):
                sub = rule.get(side) if isinstance(rule, dict) else None
                for k, actor in enumerate(_list(sub)):
                    yield f"rulesets[{i}].rules[{j}].{side}[{k}]", actor


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def named_workloads(doc: Doc) -> dict[str, list[str]]:
    """Workload names (and test endpoints that may be names) -> where the document names them."""
    out: dict[str, list[str]] = {}
    for path, actor in _actors(doc):
        if isinstance(actor, dict) and isinstance(actor.get("workload"), str):
            out.setdefault(actor["workload"], []).append(path)
    for i, t in enumerate(_list(doc.get("tests"))):
        for end in ("from", "to"):
            v = t.get(end) if isinstance(t, dict) else None
            if isinstance(v, str):
                out.setdefault(v, []).append(f"tests[{i}].{end}")
            elif isinstance(v, dict) and isinstance(v.get("workload"), str):
                out.setdefault(v["workload"], []).append(f"tests[{i}].{end}")
    return out


def validate_objects(session: Session, doc: Doc, keys: Iterable[str] | None = None) -> Policy:
    """Load `doc` (policy objects) against the current inventory: label keys and stubs of the
    workloads it names. Raises PolicyError with policy-file paths."""
    keys = tuple(keys) if keys is not None else inv.label_key_names(session)
    names = set(named_workloads(doc))
    present = sorted(r.name for r in inv._rows_named(session, names)) if names else []
    data = {**doc, "version": 1, "label_keys": list(keys),
            "workloads": [{"name": n} for n in present]}
    return policy_from_data(data)


def assemble(session: Session, doc: Doc) -> Policy:
    """The full policy: `doc`'s objects with every workload of the inventory."""
    p = validate_objects(session, doc)
    return replace(p, workloads=inv.inventory_workloads(session))


def _object_names(doc: Doc) -> dict[str, str]:
    """`rulesets[2]` -> "ruleset 'shop'" for readable messages about other objects."""
    out = {}
    for kind in LIST_KINDS:
        for i, body in enumerate(_list(doc.get(kind))):
            if isinstance(body, dict) and isinstance(body.get("name"), str):
                out[f"{kind}[{i}]"] = f"{WHAT[kind]} {body['name']!r}"
    return out


def _errors(exc: PolicyError, doc: Doc, focus: str | None, prefix: str = "") -> list[FieldError]:
    """Issues inside `focus` get paths relative to the request body; others keep their
    policy-file path and name the object they are in."""
    names = _object_names(doc)
    out = []
    for issue in exc.issues:
        path, msg = issue.path, issue.message
        if focus is not None and (path == focus or path.startswith((focus + ".",
                                                                    focus + "["))):
            path = path[len(focus):].lstrip(".")
        else:
            head = path.split(".")[0]
            if head in names:
                msg = f"{msg} (in {names[head]})"
            path = prefix + path
        out.append(FieldError(path, msg))
    return out


def _validate_edit(session: Session, doc: Doc, focus: str | None) -> Policy:
    try:
        return validate_objects(session, doc)
    except PolicyError as exc:
        raise Invalid("invalid policy object; nothing was changed",
                      _errors(exc, doc, focus)) from None


def check_objects_still_load(session: Session, *, keys: tuple[str, ...], why: str) -> None:
    """The draft and the active version must keep loading after an inventory change."""
    errors: list[FieldError] = []
    docs = [("draft:", draft_doc(session))]
    active = active_version(session)
    if active is not None:
        docs.append((f"version {active.id}:", active.objects))
    for prefix, doc in docs:
        try:
            validate_objects(session, doc, keys)
        except PolicyError as exc:
            errors += _errors(exc, doc, None, prefix)
    if errors:
        raise Conflict(f"{why} by the policy", errors)


def workload_references(session: Session, names: set[str]) -> list[str]:
    """Where the draft or the active version names one of `names`."""
    out: list[str] = []
    docs = [("draft:", draft_doc(session))]
    active = active_version(session)
    if active is not None:
        docs.append((f"version {active.id}:", active.objects))
    for prefix, doc in docs:
        for name, paths in named_workloads(doc).items():
            if name in names:
                out += [prefix + p for p in paths]
    return out


def _canonical(p: Policy, kind: str, index: int | None, raw: Any) -> Any:
    data = policy_to_data(p)
    if kind == "settings":
        return data.get("settings", {})
    if kind == "tests":
        return data.get("tests", [])
    assert index is not None
    body: dict[str, Any] = data[kind][index]
    if kind in DESCRIBED and isinstance(raw, dict) and raw.get("description"):
        body["description"] = raw["description"]
    return body


# -- scoped policy editors ----------------------------------------------------------------------

def _restricted(actor: Principal) -> dict[str, list[str]] | None:
    return actor.scope or None


def _forbid(detail: str, path: str = "") -> Forbidden:
    err = Forbidden(detail)
    err.errors.append(FieldError(path, detail))
    return err


def _require_unscoped(actor: Principal, what: str) -> None:
    if _restricted(actor) is not None:
        raise _forbid(f"{actor.label} may only change rulesets inside its scope "
                      f"{actor.scope}; not {what}")


def _group_values(name: str, groups: dict[str, Any], seen: set[str]) -> set[str]:
    g = groups.get(name)
    if not isinstance(g, dict) or name in seen:
        return set()
    seen.add(name)
    out = {str(v) for v in _list(g.get("values"))}
    for sub in _list(g.get("groups")):
        out |= _group_values(str(sub), groups, seen)
    return out


def outside_scope(body: dict[str, Any], allowed: dict[str, list[str]],
                  groups: dict[str, Any]) -> tuple[str, str] | None:
    """(path, reason) when the ruleset's scopes do not all lie inside `allowed`, else None."""
    scopes = _list(body.get("scopes"))
    if not scopes:
        return "scopes", "a global ruleset (no scopes) is outside your scope"
    for i, s in enumerate(scopes):
        if not isinstance(s, dict):
            return f"scopes[{i}]", "not a selector"
        for key, values in allowed.items():
            if key not in s:
                return f"scopes[{i}]", f"does not restrict {key!r} (you may edit only " \
                                       f"{key} in {values})"
            v = s[key]
            got = ({str(v)} if isinstance(v, str) else {str(x) for x in v}
                   if isinstance(v, list) else _group_values(str(v.get("group")), groups, set())
                   if isinstance(v, dict) else set())
            if not got or not got <= set(values):
                extra = sorted(got - set(values)) or ["?"]
                return f"scopes[{i}].{key}", f"{key} {', '.join(extra)} is outside your " \
                                              f"scope ({key} in {values})"
    return None


def _check_scope(actor: Principal, bodies: Iterable[dict[str, Any] | None], doc: Doc) -> None:
    allowed = _restricted(actor)
    if allowed is None:
        return
    groups = {str(g.get("name")): g for g in _list(doc.get("label_groups"))
              if isinstance(g, dict)}
    for body in bodies:
        if body is None:
            continue
        hit = outside_scope(body, allowed, groups)
        if hit is not None:
            raise _forbid(f"ruleset {body.get('name')!r}: {hit[1]}", hit[0])


# -- generic object CRUD ------------------------------------------------------------------------

def list_objects(session: Session, *, kind: str) -> list[DraftObject]:
    return list(session.scalars(select(DraftObject).where(DraftObject.kind == kind)
                                .order_by(DraftObject.position)))


def get_object(session: Session, *, kind: str, name: str) -> DraftObject:
    row = session.scalar(select(DraftObject).where(DraftObject.kind == kind,
                                                   DraftObject.name == name))
    if row is None:
        raise inv.not_found(WHAT[kind], name)
    return row


def _index(doc: Doc, kind: str, name: str) -> int:
    for i, body in enumerate(_list(doc.get(kind))):
        if body.get("name") == name:
            return i
    raise AssertionError(f"{kind} {name} not in document")


def _write(session: Session, *, actor: Principal, draft: PolicyDraft, row: DraftObject,
           body: Any, action: str, target: str, before: Any) -> DraftObject:
    row.body = body
    row.revision += 1
    row.updated_at = utcnow()
    row.updated_by = actor.label
    _bump(draft, actor)
    audit(session, actor=actor, action=action, target=target, before=_img(before),
          after=_img(body))
    return row


def _img(body: Any) -> Any:
    return {"tests": body} if isinstance(body, list) else body


def create_object(session: Session, *, actor: Principal, kind: str,
                  body: dict[str, Any]) -> DraftObject:
    if kind != "rulesets":
        _require_unscoped(actor, f"{WHAT[kind]}s")
    draft = lock_draft(session)
    rows = draft_rows(session)
    name = body.get("name")
    if any(r.kind == kind and r.name == name for r in rows):
        raise Conflict(f"{WHAT[kind]} {name!r} exists", [FieldError("name", "already exists")])
    doc = objects_doc(rows)
    doc[kind] = [*doc.get(kind, []), body]
    index = len(doc[kind]) - 1
    p = _validate_edit(session, doc, f"{kind}[{index}]")
    canonical = _canonical(p, kind, index, body)
    if kind == "rulesets":
        _check_scope(actor, [canonical], doc)
    pos = max((r.position for r in rows if r.kind == kind), default=-1) + 1
    row = DraftObject(kind=kind, name=canonical["name"], position=pos, revision=0, body=None)
    session.add(row)
    _write(session, actor=actor, draft=draft, row=row, body=canonical,
           action=f"{SINGULAR[kind]}.create", target=f"{SINGULAR[kind]}:{row.name}",
           before=None)
    _flush_or_conflict(session, f"{WHAT[kind]} {name!r} exists")
    return row


def replace_object(session: Session, *, actor: Principal, kind: str, name: str,
                   body: dict[str, Any], expected: Iterable[int] | None = None
                   ) -> DraftObject:
    if kind != "rulesets":
        _require_unscoped(actor, f"{WHAT[kind]}s")
    draft = lock_draft(session)
    row = get_object(session, kind=kind, name=name)
    inv.check_revision(row.revision, expected, f"{WHAT[kind]} {name!r}")
    if body.get("name", name) != name:
        raise Invalid("renaming is not supported", [FieldError(
            "name", "must equal the name in the path (create a new object to rename)")])
    body = {"name": name, **{k: v for k, v in body.items() if k != "name"}}
    doc = draft_doc(session)
    index = _index(doc, kind, name)
    doc[kind][index] = body
    p = _validate_edit(session, doc, f"{kind}[{index}]")
    canonical = _canonical(p, kind, index, body)
    if kind == "rulesets":
        _check_scope(actor, [row.body, canonical], doc)
    if canonical == row.body:
        return row
    return _write(session, actor=actor, draft=draft, row=row, body=canonical,
                  action=f"{SINGULAR[kind]}.update", target=f"{SINGULAR[kind]}:{name}",
                  before=row.body)


def merge_patch(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 at the top level: given fields replace, null removes."""
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def patch_object(session: Session, *, actor: Principal, kind: str, name: str,
                 changes: dict[str, Any], expected: Iterable[int] | None = None
                 ) -> DraftObject:
    lock_draft(session)
    row = get_object(session, kind=kind, name=name)
    return replace_object(session, actor=actor, kind=kind, name=name,
                          body=merge_patch(row.body, changes), expected=expected)


def delete_object(session: Session, *, actor: Principal, kind: str, name: str,
                  expected: Iterable[int] | None = None) -> None:
    if kind != "rulesets":
        _require_unscoped(actor, f"{WHAT[kind]}s")
    draft = lock_draft(session)
    row = get_object(session, kind=kind, name=name)
    inv.check_revision(row.revision, expected, f"{WHAT[kind]} {name!r}")
    doc = draft_doc(session)
    if kind == "rulesets":
        _check_scope(actor, [row.body], doc)
    doc[kind] = [b for b in doc[kind] if b.get("name") != name]
    if not doc[kind]:
        del doc[kind]
    try:
        validate_objects(session, doc)
    except PolicyError as exc:
        raise Conflict(f"{WHAT[kind]} {name!r} is in use; nothing was deleted",
                       _errors(exc, doc, None)) from None
    _bump(draft, actor)
    audit(session, actor=actor, action=f"{SINGULAR[kind]}.delete",
          target=f"{SINGULAR[kind]}:{name}", before=row.body)
    session.delete(row)


def _flush_or_conflict(session: Session, detail: str) -> None:
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(detail, [FieldError("name", detail)]) from None


# -- singletons: settings, policy tests ---------------------------------------------------------

def get_singleton(session: Session, *, kind: str) -> tuple[Any, int]:
    row = session.scalar(select(DraftObject).where(DraftObject.kind == kind))
    empty: Any = [] if kind == "tests" else {}
    return (row.body, row.revision) if row is not None else (empty, 0)


def put_singleton(session: Session, *, actor: Principal, kind: str, body: Any,
                  expected: Iterable[int] | None = None) -> tuple[Any, int]:
    _require_unscoped(actor, WHAT[kind])
    draft = lock_draft(session)
    row = session.scalar(select(DraftObject).where(DraftObject.kind == kind))
    inv.check_revision(row.revision if row else 0, expected, WHAT[kind])
    doc = draft_doc(session)
    doc[kind] = body
    p = _validate_edit(session, doc, "settings" if kind == "settings" else None)
    canonical = _canonical(p, kind, None, body)
    if row is None:
        row = DraftObject(kind=kind, name=kind, position=0, revision=0, body=None)
        session.add(row)
        before: Any = [] if kind == "tests" else {}
    elif row.body == canonical:
        return row.body, row.revision
    else:
        before = row.body
    _write(session, actor=actor, draft=draft, row=row, body=canonical,
           action=f"{SINGULAR[kind]}.update", target=SINGULAR[kind], before=before)
    return row.body, row.revision


# -- rules inside a ruleset -------------------------------------------------------------------

def rule_id(ruleset: str, index: int, rule: dict[str, Any]) -> str:
    rid = rule.get("id")
    return rid if isinstance(rid, str) and rid else f"{ruleset}/{index}"


def get_rule(session: Session, *, ruleset: str, rid: str
             ) -> tuple[DraftObject, int, dict[str, Any]]:
    row = get_object(session, kind="rulesets", name=ruleset)
    for i, rule in enumerate(row.body.get("rules", [])):
        if rule_id(ruleset, i, rule) == rid:
            return row, i, rule
    raise inv.not_found("rule", f"{rid} in ruleset {ruleset!r}", "rule_id")


def _edit_rules(session: Session, *, actor: Principal, draft: PolicyDraft, row: DraftObject,
                rules: list[dict[str, Any]], focus: int | None, action: str, target: str,
                before: Any) -> tuple[DraftObject, int | None]:
    doc = draft_doc(session)
    index = _index(doc, "rulesets", row.name)
    doc["rulesets"][index] = {**row.body, "rules": rules}
    focus_path = f"rulesets[{index}].rules[{focus}]" if focus is not None else None
    try:
        p = validate_objects(session, doc)
    except PolicyError as exc:
        errors = _errors(exc, doc, focus_path)
        if focus is None:
            raise Conflict("the rule is in use; nothing was changed", errors) from None
        raise Invalid("invalid rule; nothing was changed", errors) from None
    canonical = _canonical(p, "rulesets", index, None)
    _check_scope(actor, [row.body, canonical], doc)
    after = canonical["rules"][focus] if focus is not None else None
    if canonical == row.body:
        return row, focus
    row.body = canonical
    row.revision += 1
    row.updated_at, row.updated_by = utcnow(), actor.label
    _bump(draft, actor)
    audit(session, actor=actor, action=action, target=target, before=before, after=after)
    return row, focus


def create_rule(session: Session, *, actor: Principal, ruleset: str, rule: dict[str, Any],
                position: int | None = None, expected: Iterable[int] | None = None
                ) -> tuple[DraftObject, int]:
    draft = lock_draft(session)
    row = get_object(session, kind="rulesets", name=ruleset)
    inv.check_revision(row.revision, expected, f"ruleset {ruleset!r}")
    rules = list(row.body.get("rules", []))
    if position is not None and not 0 <= position <= len(rules):
        raise Invalid("position out of range", [FieldError(
            "query:position", f"between 0 and {len(rules)}")])
    at = len(rules) if position is None else position
    rules.insert(at, rule)
    row, _ = _edit_rules(session, actor=actor, draft=draft, row=row, rules=rules, focus=at,
                         action="rule.create", target=f"rule:{ruleset}/"
                         f"{rule_id(ruleset, at, rule)}", before=None)
    return row, at


def replace_rule(session: Session, *, actor: Principal, ruleset: str, rid: str,
                 rule: dict[str, Any], expected: Iterable[int] | None = None
                 ) -> tuple[DraftObject, int]:
    draft = lock_draft(session)
    row, i, old = get_rule(session, ruleset=ruleset, rid=rid)
    inv.check_revision(row.revision, expected, f"ruleset {ruleset!r}")
    rules = list(row.body["rules"])
    rules[i] = rule
    row, _ = _edit_rules(session, actor=actor, draft=draft, row=row, rules=rules, focus=i,
                         action="rule.update", target=f"rule:{ruleset}/{rid}", before=old)
    return row, i


def patch_rule(session: Session, *, actor: Principal, ruleset: str, rid: str,
               changes: dict[str, Any], expected: Iterable[int] | None = None
               ) -> tuple[DraftObject, int]:
    lock_draft(session)
    _, _, old = get_rule(session, ruleset=ruleset, rid=rid)
    return replace_rule(session, actor=actor, ruleset=ruleset, rid=rid,
                        rule=merge_patch(old, changes), expected=expected)


def delete_rule(session: Session, *, actor: Principal, ruleset: str, rid: str,
                expected: Iterable[int] | None = None) -> DraftObject:
    draft = lock_draft(session)
    row, i, old = get_rule(session, ruleset=ruleset, rid=rid)
    inv.check_revision(row.revision, expected, f"ruleset {ruleset!r}")
    rules = [r for j, r in enumerate(row.body["rules"]) if j != i]
    row, _ = _edit_rules(session, actor=actor, draft=draft, row=row, rules=rules, focus=None,
                         action="rule.delete", target=f"rule:{ruleset}/{rid}", before=old)
    return row


# -- versions, changes, diff --------------------------------------------------------------------

def active_version(session: Session) -> PolicyVersion | None:
    return session.scalar(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1))


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
