"""Policy API: the draft's objects (label groups, IP lists, services, user groups, rulesets and
their rules, settings, policy tests), provision, versions, diff, revert, import and export.

Every edit changes the draft; `POST /policy/provision` makes it active."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel

from bulkhead.server.api.inventory import (
    IfMatch,
    RawBody,
    StateDep,
    body_text,
    etag,
    expected,
    reject_nul,
)
from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.models.policy import DraftObject, PolicyVersion
from bulkhead.server.schemas.policy import (
    DiffResult,
    DraftChanges,
    ImportResult,
    IPListCreate,
    IPListPatch,
    IPListPublic,
    IPListUpdate,
    LabelGroupCreate,
    LabelGroupPatch,
    LabelGroupPublic,
    LabelGroupUpdate,
    PolicyTestsPublic,
    PolicyTestsUpdate,
    ProvisionRequest,
    ProvisionResult,
    RevertRequest,
    RevertResult,
    RuleCreate,
    RulePatch,
    RulePublic,
    RulesetCreate,
    RulesetPatch,
    RulesetPublic,
    RulesetUpdate,
    RuleUpdate,
    ServiceCreate,
    ServicePatch,
    ServicePublic,
    ServiceUpdate,
    SettingsPublic,
    SettingsUpdate,
    UserGroupCreate,
    UserGroupPatch,
    UserGroupPublic,
    UserGroupUpdate,
    VersionDetail,
    VersionPage,
)
from bulkhead.server.services import policy as svc
from bulkhead.server.services import versions as versions_svc

router = APIRouter(tags=["policy"], dependencies=[Depends(reject_nul)])
Reader = Annotated[Principal, Depends(require("policy:read"))]
Writer = Annotated[Principal, Depends(require("policy:write"))]
Provisioner = Annotated[Principal, Depends(require("policy:provision"))]
Exporter = Annotated[Principal, Depends(require("inventory:read"))]
MEDIA = {"json": "application/json", "yaml": "application/yaml"}


def _public(row: DraftObject, response: Response | None = None) -> dict[str, Any]:
    if response is not None:
        etag(response, row.revision)
    return {**row.body, "revision": row.revision, "updated_at": row.updated_at,
            "updated_by": row.updated_by}


def _body(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True, exclude={"revision"})


def _changes(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_unset=True, exclude={"revision"})


def _object_routes(kind: str, path: str, create: type[BaseModel], update: type[BaseModel],
                   patch: type[BaseModel], public: type[BaseModel]) -> None:
    """List, create, get, replace, patch and delete one kind of draft object."""
    what = svc.WHAT[kind]
    opts: dict[str, Any] = {"response_model": public, "response_model_exclude_none": True}

    @router.get(path, response_model=list[public], response_model_exclude_none=True,  # type: ignore[valid-type]
                summary=f"List {what}s (draft)", name=f"list_{kind}")
    def list_(session: SessionDep, _: Reader) -> list[dict[str, Any]]:
        return [_public(r) for r in svc.list_objects(session, kind=kind)]

    @router.post(path, status_code=201, summary=f"Create a {what}", name=f"create_{kind}",
                 **opts)
    def create_(body: create, session: SessionDep, actor: Writer,  # type: ignore[valid-type]
                response: Response) -> dict[str, Any]:
        row = svc.create_object(session, actor=actor, kind=kind, body=_body(body))
        return _public(row, response)

    @router.get(path + "/{name}", summary=f"Get a {what}", name=f"get_{kind}", **opts)
    def get_(name: str, session: SessionDep, _: Reader, response: Response) -> dict[str, Any]:
        return _public(svc.get_object(session, kind=kind, name=name), response)

    @router.put(path + "/{name}", summary=f"Replace a {what}", name=f"replace_{kind}", **opts)
    def put_(name: str, body: update, session: SessionDep,  # type: ignore[valid-type]
             actor: Writer, response: Response, if_match: IfMatch = None) -> dict[str, Any]:
        row = svc.replace_object(session, actor=actor, kind=kind, name=name, body=_body(body),
                                 expected=expected(if_match, body.revision))  # type: ignore[attr-defined]
        return _public(row, response)

    @router.patch(path + "/{name}", summary=f"Change some fields of a {what} (merge patch)",
                  name=f"patch_{kind}", **opts)
    def patch_(name: str, body: patch, session: SessionDep,  # type: ignore[valid-type]
               actor: Writer, response: Response, if_match: IfMatch = None) -> dict[str, Any]:
        row = svc.patch_object(session, actor=actor, kind=kind, name=name,
                               changes=_changes(body),
                               expected=expected(if_match, body.revision))  # type: ignore[attr-defined]
        return _public(row, response)

    @router.delete(path + "/{name}", status_code=204, summary=f"Delete a {what}",
                   name=f"delete_{kind}")
    def delete_(name: str, session: SessionDep, actor: Writer,
                if_match: IfMatch = None) -> Response:
        svc.delete_object(session, actor=actor, kind=kind, name=name,
                          expected=expected(if_match))
        return Response(status_code=204)


_object_routes("label_groups", "/label-groups", LabelGroupCreate, LabelGroupUpdate,
               LabelGroupPatch, LabelGroupPublic)
_object_routes("ip_lists", "/ip-lists", IPListCreate, IPListUpdate, IPListPatch, IPListPublic)
_object_routes("services", "/services", ServiceCreate, ServiceUpdate, ServicePatch,
               ServicePublic)
_object_routes("user_groups", "/user-groups", UserGroupCreate, UserGroupUpdate,
               UserGroupPatch, UserGroupPublic)
_object_routes("rulesets", "/rulesets", RulesetCreate, RulesetUpdate, RulesetPatch,
               RulesetPublic)


# -- rules ----------------------------------------------------------------------------------------

def _rule(row: DraftObject, index: int, response: Response | None = None) -> dict[str, Any]:
    if response is not None:
        etag(response, row.revision)
    rule = row.body["rules"][index]
    return {"ruleset": row.name, "index": index, "effective_id": svc.rule_id(row.name, index,
                                                                              rule),
            "revision": row.revision, "rule": rule}


@router.get("/rulesets/{name}/rules", response_model=list[RulePublic])
def list_rules(name: str, session: SessionDep, _: Reader,
               response: Response) -> list[dict[str, Any]]:
    row = svc.get_object(session, kind="rulesets", name=name)
    etag(response, row.revision)
    return [_rule(row, i) for i in range(len(row.body.get("rules", [])))]


@router.post("/rulesets/{name}/rules", response_model=RulePublic, status_code=201)
def create_rule(name: str, body: RuleCreate, session: SessionDep, actor: Writer,
                response: Response, if_match: IfMatch = None,
                position: Annotated[int | None, Query(
                    description="insert at this index (default: append)")] = None
                ) -> dict[str, Any]:
    row, i = svc.create_rule(session, actor=actor, ruleset=name, rule=_body(body),
                             position=position, expected=expected(if_match))
    return _rule(row, i, response)


@router.get("/rulesets/{name}/rules/{rule_id:path}", response_model=RulePublic)
def get_rule(name: str, rule_id: str, session: SessionDep, _: Reader,
             response: Response) -> dict[str, Any]:
    row, i, _rule_body = svc.get_rule(session, ruleset=name, rid=rule_id)
    return _rule(row, i, response)


@router.put("/rulesets/{name}/rules/{rule_id:path}", response_model=RulePublic)
def replace_rule(name: str, rule_id: str, body: RuleUpdate, session: SessionDep,
                 actor: Writer, response: Response,
                 if_match: IfMatch = None) -> dict[str, Any]:
    row, i = svc.replace_rule(session, actor=actor, ruleset=name, rid=rule_id,
                              rule=_body(body), expected=expected(if_match, body.revision))
    return _rule(row, i, response)


@router.patch("/rulesets/{name}/rules/{rule_id:path}", response_model=RulePublic)
def patch_rule(name: str, rule_id: str, body: RulePatch, session: SessionDep, actor: Writer,
               response: Response, if_match: IfMatch = None) -> dict[str, Any]:
    row, i = svc.patch_rule(session, actor=actor, ruleset=name, rid=rule_id,
                            changes=_changes(body), expected=expected(if_match, body.revision))
    return _rule(row, i, response)


@router.delete("/rulesets/{name}/rules/{rule_id:path}", status_code=204)
def delete_rule(name: str, rule_id: str, session: SessionDep, actor: Writer,
                if_match: IfMatch = None) -> Response:
    svc.delete_rule(session, actor=actor, ruleset=name, rid=rule_id,
                    expected=expected(if_match))
    return Response(status_code=204)


# -- settings and policy tests ----------------------------------------------------------------

@router.get("/settings", response_model=SettingsPublic)
def get_settings(session: SessionDep, _: Reader, response: Response) -> dict[str, Any]:
    body, rev = svc.get_singleton(session, kind="settings")
    etag(response, rev)
    return {"outbound": body.get("outbound", "enforce"), "revision": rev}


@router.put("/settings", response_model=SettingsPublic)
def put_settings(body: SettingsUpdate, session: SessionDep, actor: Writer, response: Response,
                 if_match: IfMatch = None) -> dict[str, Any]:
    data, rev = svc.put_singleton(session, actor=actor, kind="settings",
                                  body=_body(body), expected=expected(if_match, body.revision))
    etag(response, rev)
    return {"outbound": data.get("outbound", "enforce"), "revision": rev}


@router.get("/policy-tests", response_model=PolicyTestsPublic)
def get_policy_tests(session: SessionDep, _: Reader, response: Response) -> dict[str, Any]:
    tests, rev = svc.get_singleton(session, kind="tests")
    etag(response, rev)
    return {"tests": tests, "revision": rev}


@router.put("/policy-tests", response_model=PolicyTestsPublic)
def put_policy_tests(body: PolicyTestsUpdate, session: SessionDep, actor: Writer,
                     response: Response, if_match: IfMatch = None) -> dict[str, Any]:
    tests, rev = svc.put_singleton(session, actor=actor, kind="tests", body=body.tests,
                                   expected=expected(if_match, body.revision))
    etag(response, rev)
    return {"tests": tests, "revision": rev}


# -- the whole policy -----------------------------------------------------------------------------

Format = Annotated[Literal["json", "yaml"], Query(description="json or yaml")]


def _file(session: SessionDep, ref: str, fmt: str, workloads: bool, download: bool
          ) -> Response:
    data, label = versions_svc.export_data(session, ref=ref, workloads=workloads)
    headers = {}
    if download:
        name = label.split(" (")[0].replace(" ", "-")
        headers["Content-Disposition"] = f'attachment; filename="policy-{name}.{fmt}"'
    return Response(versions_svc.render(data, fmt), media_type=MEDIA[fmt], headers=headers)


@router.get("/policy/draft", responses={200: {"content": {"application/yaml": {}}}})
def get_draft(session: SessionDep, _: Reader, __: Exporter, format: Format = "json",
              workloads: bool = True) -> Response:
    """The whole draft policy (draft objects + current inventory) as a policy file;
    its ETag is the draft revision (If-Match for import, revert and provision)."""
    resp = _file(session, "draft", format, workloads, download=False)
    etag(resp, svc.draft_revision(session))
    return resp


@router.get("/policy/draft/changes", response_model=DraftChanges)
def get_draft_changes(session: SessionDep, _: Reader, response: Response) -> dict[str, Any]:
    """Objects added, modified or deleted in the draft since the active version."""
    out = versions_svc.draft_changes(session)
    etag(response, out["draft_revision"])
    return out


@router.get("/policy/export", responses={200: {"content": {"application/yaml": {}}}})
def export_policy(session: SessionDep, _: Reader, __: Exporter,
                  version: Annotated[str, Query(
                      description="a version number, 'active' or 'draft'")] = "active",
                  format: Format = "yaml", workloads: bool = True) -> Response:
    """A policy file of a version (or the draft) with the current inventory; importing it
    gives back the same policy."""
    return _file(session, version, format, workloads, download=True)


@router.post("/policy/import", response_model=ImportResult, response_model_exclude_none=True,
             openapi_extra={
    "requestBody": {"required": True, "content": {
        "application/yaml": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "object"}}}}})
def import_policy(data: RawBody, session: SessionDep, actor: Writer, state: StateDep,
                  if_match: IfMatch = None,
                  workloads: Annotated[Literal["upsert", "replace", "skip"], Query(
                      description="upsert: create/update the file's workloads; replace: also "
                                  "delete the others; skip: leave the inventory alone")
                  ] = "upsert") -> dict[str, Any]:
    """Replace the draft's objects and the label keys with a policy file's (YAML or JSON); all
    or nothing, every error named by its path and line."""
    return versions_svc.import_policy(session, actor=actor, text=body_text(data),
                                      workloads=workloads, expected=expected(if_match),
                                      state=state)


def _version(v: PolicyVersion, objects: bool = False) -> dict[str, Any]:
    out = {"id": v.id, "created_at": v.created_at, "author": v.author, "note": v.note,
           "draft_revision": v.draft_revision, "summary": v.summary}
    if objects:
        out["objects"] = v.objects
    return out


@router.post("/policy/provision", response_model=ProvisionResult, status_code=201)
def provision(body: ProvisionRequest, session: SessionDep, actor: Provisioner,
              state: StateDep, if_match: IfMatch = None) -> dict[str, Any]:
    """Make the draft the active policy as a new immutable version. Refuses a draft that does
    not load or has lint errors (422), and an empty change (409) unless `force`."""
    v, warnings = versions_svc.provision(session, actor=actor, note=body.note,
                                         force=body.force,
                                         expected=expected(if_match, body.draft_revision),
                                         state=state)
    return {**_version(v), "warnings": warnings}


@router.get("/policy/versions", response_model=VersionPage)
def list_versions(session: SessionDep, _: Reader,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> dict[str, Any]:
    rows, total = versions_svc.list_versions(session, limit=limit, offset=offset)
    return {"items": [_version(v) for v in rows], "total": total, "limit": limit,
            "offset": offset}


@router.get("/policy/versions/{version_id}", response_model=VersionDetail)
def get_version(version_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep,
                _: Reader) -> dict[str, Any]:
    return _version(versions_svc.get_version(session, version=version_id), objects=True)


@router.get("/policy/diff", response_model=DiffResult, response_model_by_alias=True)
def diff(session: SessionDep, _: Reader,
         from_: Annotated[str, Query(alias="from",
                                     description="version number, 'active' or 'draft'")
                          ] = "active",
         to: Annotated[str, Query(description="version number, 'active' or 'draft'")
                       ] = "draft") -> dict[str, Any]:
    """Object changes and the semantic diff (bulkhead.policy.diff) between two policies,
    each with the current inventory."""
    return versions_svc.diff_policies(session, from_=from_, to=to)


@router.post("/policy/revert", response_model=RevertResult, response_model_exclude_none=True)
def revert(body: RevertRequest, session: SessionDep, actor: Writer,
           if_match: IfMatch = None) -> dict[str, Any]:
    """Set the draft's objects to those of a version (audited; does not provision)."""
    return versions_svc.revert(session, actor=actor, version=body.version,
                               expected=expected(if_match, body.draft_revision))
