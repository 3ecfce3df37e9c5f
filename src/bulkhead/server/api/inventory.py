"""Inventory API: label keys, labels, workloads (live; every change takes effect at once)."""

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.errors import FieldError, Invalid
from bulkhead.server.models.policy import Label, LabelKey, WorkloadRow
from bulkhead.server.policystate import PolicyState
from bulkhead.server.schemas.policy import (
    EnforcementRequest,
    EnforcementResult,
    ImportReport,
    LabelCreate,
    LabelKeyCreate,
    LabelKeyPublic,
    LabelKeyUpdate,
    LabelPublic,
    LabelUpdate,
    WorkloadCreate,
    WorkloadPage,
    WorkloadPatch,
    WorkloadPublic,
    WorkloadUpdate,
)
from bulkhead.server.services import inventory as svc


def reject_nul(request: Request) -> None:
    """NUL characters in path or query parameters: 422 (PostgreSQL text cannot hold them)."""
    errors = [FieldError(f"path:{k}", "must not contain NUL characters")
              for k, v in request.path_params.items() if "\x00" in str(v)]
    errors += [FieldError(f"query:{k}", "must not contain NUL characters")
               for k, v in request.query_params.multi_items() if "\x00" in v or "\x00" in k]
    if errors:
        raise Invalid("NUL characters are not allowed", errors)


def body_text(data: bytes) -> str:
    """A raw request body as text: UTF-8 (a BOM is ignored), no NUL characters."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Invalid("not UTF-8", [FieldError("", "the body is not UTF-8 text")]) from None
    if "\x00" in text:
        raise Invalid("NUL characters are not allowed", [FieldError(
            "", "the body must not contain NUL characters")])
    return text


router = APIRouter(tags=["inventory"], dependencies=[Depends(reject_nul)])
Reader = Annotated[Principal, Depends(require("inventory:read"))]
Writer = Annotated[Principal, Depends(require("inventory:write"))]
IfMatch = Annotated[str | None, Header(description="ETag of the version you edit")]


def get_state(request: Request) -> PolicyState:
    state = request.app.state.policy
    assert isinstance(state, PolicyState)
    return state


StateDep = Annotated[PolicyState, Depends(get_state)]


async def raw_body(request: Request) -> bytes:
    return await request.body()


RawBody = Annotated[bytes, Depends(raw_body)]


# -- optimistic concurrency (shared with api/policy.py) ----------------------------------------

class Expected(frozenset[int]):
    """Revisions the caller accepts, and where they came from (for the 412's field path)."""

    path: str = "header:If-Match"


def expected(if_match: str | None, revision: int | None = None) -> Expected | None:
    if if_match is not None and if_match.strip() != "*":
        revs = set()
        for tag in if_match.split(","):
            t = tag.strip().removeprefix("W/").strip('"')
            if not (t.isascii() and t.isdigit()):
                raise Invalid("invalid If-Match", [FieldError(
                    "header:If-Match", f"expected an ETag from this API (\"3\"), got {tag!r}")])
            revs.add(int(t))
        return Expected(revs)
    if revision is not None:
        e = Expected({revision})
        e.path = "revision"
        return e
    return None


def etag(response: Response, revision: int) -> None:
    response.headers["ETag"] = f'"{revision}"'


# -- label keys ---------------------------------------------------------------------------------

def _key_public(row: LabelKey, used: int = 0) -> dict[str, Any]:
    return {"name": row.name, "position": row.position, "description": row.description,
            "revision": row.revision, "workloads": used}


@router.get("/label-keys", response_model=list[LabelKeyPublic])
def list_label_keys(session: SessionDep, _: Reader) -> list[dict[str, Any]]:
    used = svc.key_usage(session)
    return [_key_public(k, used.get(k.name, 0)) for k in svc.list_label_keys(session)]


@router.post("/label-keys", response_model=LabelKeyPublic, status_code=201)
def create_label_key(body: LabelKeyCreate, session: SessionDep, actor: Writer,
                     response: Response) -> dict[str, Any]:
    row = svc.create_label_key(session, actor=actor, name=body.name,
                               description=body.description)
    etag(response, row.revision)
    return _key_public(row)


@router.get("/label-keys/{name}", response_model=LabelKeyPublic)
def get_label_key(name: str, session: SessionDep, _: Reader,
                  response: Response) -> dict[str, Any]:
    row = svc.get_label_key(session, name=name)
    etag(response, row.revision)
    return _key_public(row, svc.key_usage(session).get(name, 0))


@router.patch("/label-keys/{name}", response_model=LabelKeyPublic)
def update_label_key(name: str, body: LabelKeyUpdate, session: SessionDep, actor: Writer,
                     response: Response, if_match: IfMatch = None) -> dict[str, Any]:
    row = svc.update_label_key(session, actor=actor, name=name, description=body.description,
                               expected=expected(if_match, body.revision))
    etag(response, row.revision)
    return _key_public(row, svc.key_usage(session).get(name, 0))


@router.delete("/label-keys/{name}", status_code=204)
def delete_label_key(name: str, session: SessionDep, actor: Writer,
                     if_match: IfMatch = None) -> Response:
    svc.delete_label_key(session, actor=actor, name=name, expected=expected(if_match))
    return Response(status_code=204)


# -- labels -------------------------------------------------------------------------------------

def _label_public(row: Label, used: int) -> dict[str, Any]:
    return {"key": row.key, "value": row.value, "description": row.description,
            "revision": row.revision, "workloads": used}


@router.get("/labels", response_model=list[LabelPublic])
def list_labels(session: SessionDep, _: Reader,
                key: Annotated[str | None, Query(description="only this key")] = None
                ) -> list[dict[str, Any]]:
    return [_label_public(lab, n) for lab, n in svc.list_labels(session, key=key)]


@router.post("/labels", response_model=LabelPublic, status_code=201)
def create_label(body: LabelCreate, session: SessionDep, actor: Writer,
                 response: Response) -> dict[str, Any]:
    row = svc.create_label(session, actor=actor, key=body.key, value=body.value,
                           description=body.description)
    etag(response, row.revision)
    return _label_public(row, 0)


@router.get("/labels/{key}/{value}", response_model=LabelPublic)
def get_label(key: str, value: str, session: SessionDep, _: Reader,
              response: Response) -> dict[str, Any]:
    row, used = svc.get_label(session, key=key, value=value)
    etag(response, row.revision)
    return _label_public(row, used)


@router.patch("/labels/{key}/{value}", response_model=LabelPublic)
def update_label(key: str, value: str, body: LabelUpdate, session: SessionDep, actor: Writer,
                 response: Response, if_match: IfMatch = None) -> dict[str, Any]:
    svc.update_label(session, actor=actor, key=key, value=value, description=body.description,
                     expected=expected(if_match, body.revision))
    row, used = svc.get_label(session, key=key, value=value)
    etag(response, row.revision)
    return _label_public(row, used)


@router.delete("/labels/{key}/{value}", status_code=204)
def delete_label(key: str, value: str, session: SessionDep, actor: Writer,
                 if_match: IfMatch = None) -> Response:
    svc.delete_label(session, actor=actor, key=key, value=value, expected=expected(if_match))
    return Response(status_code=204)


# -- workloads ----------------------------------------------------------------------------------

def _workload(row: WorkloadRow, response: Response | None = None) -> dict[str, Any]:
    if response is not None:
        etag(response, row.revision)
    return svc.workload_public(row)


def _label_filters(values: list[str]) -> list[tuple[str, list[str]]]:
    out, errors = [], []
    for i, item in enumerate(values):
        k, sep, v = item.partition("=")
        if not sep:
            k, sep, v = item.partition(":")
        if not sep or not k or not v:
            errors.append(FieldError(f"query:label[{i}]", f"expected key=value[,value…], "
                                                          f"got {item!r}"))
        else:
            out.append((k, v.split(",")))
    if errors:
        raise Invalid("invalid label filter", errors)
    return out


@router.get("/workloads", response_model=WorkloadPage)
def list_workloads(
    session: SessionDep, _: Reader,
    label: Annotated[list[str], Query(description="key=value or key=v1,v2; repeat to AND")] = [],  # noqa: B006
    name: Annotated[str | None, Query(description="substring of name or hostname")] = None,
    ip: Annotated[str | None, Query(description="exact address")] = None,
    managed: bool | None = None,
    enforcement: Literal["idle", "visibility", "selective", "full"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    if cursor is not None and offset:
        raise Invalid("use cursor or offset", [FieldError("query:offset",
                                                          "not with cursor")])
    rows, total, nxt = svc.list_workloads(session, labels=_label_filters(label), name=name,
                                          ip=ip, managed=managed, enforcement=enforcement,
                                          limit=limit, offset=offset, cursor=cursor)
    return {"items": [svc.workload_public(r) for r in rows], "total": total, "limit": limit,
            "offset": offset, "next_cursor": nxt}


@router.post("/workloads", response_model=WorkloadPublic, status_code=201)
def create_workload(body: WorkloadCreate, session: SessionDep, actor: Writer,
                    state: StateDep, response: Response) -> dict[str, Any]:
    row = svc.create_workload(session, actor=actor, data=body.model_dump(exclude_none=True),
                              state=state)
    return _workload(row, response)


@router.post("/workloads/import", response_model=ImportReport, openapi_extra={
    "requestBody": {"required": True, "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}}})
def import_workloads(
    data: RawBody, request: Request, session: SessionDep, actor: Writer, state: StateDep,
    mode: Annotated[Literal["atomic", "best_effort"], Query(
        description="atomic: any bad row → 422 and nothing imported; best_effort: good rows "
                    "applied, bad rows reported")] = "atomic",
    dry_run: bool = False,
    format: Annotated[Literal["csv", "json"] | None, Query(
        description="default: from Content-Type")] = None,
) -> dict[str, Any]:
    fmt = format or ("json" if "json" in request.headers.get("content-type", "") else "csv")
    text = body_text(data)
    if fmt == "json":
        try:
            rows = svc.json_rows(json.loads(text))
        except json.JSONDecodeError as exc:
            raise Invalid("invalid JSON", [FieldError(f"line {exc.lineno}", exc.msg)]) from None
    else:
        rows = svc.parse_csv(text, svc.label_key_names(session))
    return svc.import_workloads(session, actor=actor, rows=rows,
                                best_effort=mode == "best_effort", dry_run=dry_run,
                                state=state)


@router.post("/workloads/enforcement", response_model=EnforcementResult)
def set_enforcement(body: EnforcementRequest, session: SessionDep, actor: Writer,
                    state: StateDep) -> dict[str, Any]:
    matched, changed = svc.set_enforcement(session, actor=actor, enforcement=body.enforcement,
                                           names=body.names, selector=body.labels, state=state)
    return {"enforcement": body.enforcement, "matched": matched, "changed": changed}


@router.get("/workloads/{name}", response_model=WorkloadPublic)
def get_workload(name: str, session: SessionDep, _: Reader,
                 response: Response) -> dict[str, Any]:
    return _workload(svc.get_workload(session, name=name), response)


@router.put("/workloads/{name}", response_model=WorkloadPublic)
def replace_workload(name: str, body: WorkloadUpdate, session: SessionDep, actor: Writer,
                     state: StateDep, response: Response,
                     if_match: IfMatch = None) -> dict[str, Any]:
    row = svc.replace_workload(session, actor=actor, name=name,
                               data=body.model_dump(exclude_none=True, exclude={"revision"}),
                               expected=expected(if_match, body.revision), state=state)
    return _workload(row, response)


@router.patch("/workloads/{name}", response_model=WorkloadPublic)
def patch_workload(name: str, body: WorkloadPatch, session: SessionDep, actor: Writer,
                   state: StateDep, response: Response,
                   if_match: IfMatch = None) -> dict[str, Any]:
    row = svc.patch_workload(session, actor=actor, name=name,
                             changes=body.model_dump(exclude_unset=True, exclude={"revision"}),
                             expected=expected(if_match, body.revision), state=state)
    return _workload(row, response)


@router.delete("/workloads/{name}", status_code=204)
def delete_workload(name: str, session: SessionDep, actor: Writer, state: StateDep,
                    if_match: IfMatch = None) -> Response:
    svc.delete_workload(session, actor=actor, name=name, expected=expected(if_match),
                        state=state)
    return Response(status_code=204)

