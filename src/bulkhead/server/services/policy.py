"""The policy draft: its row and lock, validation, scoped editors, and the edits of its
objects (label groups, IP lists, services, user groups, rulesets, their rules, settings, tests).

The draft is a set of rows (`DraftObject`), one per policy object, each body in the
policy-file form. Every edit assembles the draft's objects into a policy document, applies the
change and validates the result with the policy-file loader (`policy_from_data`): one format,
one set of rules and messages for the API, the file and the console. Workloads are live
inventory; for this validation the document carries only stubs (`{name}`) of the workloads the
policy names, so an edit costs O(draft), not O(inventory).

Every draft mutation first takes the draft lock (an UPDATE of the one `policy_draft` row: a
row lock on PostgreSQL, the writer lock on SQLite) and only then reads, so two concurrent
edits validate one after the other and the draft is always loadable. Versions, provision,
the compiled state, revert and import/export are in `services.versions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bulkhead.domain.errors import PolicyError
from bulkhead.domain.model import Policy
from bulkhead.policy.fileformat import policy_from_data, policy_to_data
from bulkhead.server.auth import Principal
from bulkhead.server.db import utcnow
from bulkhead.server.errors import Conflict, FieldError, Forbidden, Invalid
from bulkhead.server.models.policy import DraftObject, PolicyDraft, PolicyVersion
from bulkhead.server.services import inventory as inv
from bulkhead.server.services.audit import audit

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


def active_version(session: Session) -> PolicyVersion | None:
    """The latest version (the active policy's objects), or None."""
    return session.scalar(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1))


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
