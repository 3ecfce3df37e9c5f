"""Traffic explorer (`GET /traffic`, `GET /traffic/export.csv`, `GET /traffic/map`) and what-if
(`POST /traffic/what-if`) over the flow store. Thin: parsing and evaluation live in
`bulkhead.server.services.traffic`.

Filters (query parameters; repeat a key or separate values with commas to OR them):
`from`/`to` (RFC 3339 with zone, epoch seconds, or `-24h`-style relative), `src`, `dst`,
`workload` (workload names; `workload` = either end), `src.KEY=V` / `dst.KEY=V` (labels, e.g.
`src.app=shop`), `src_ip`, `dst_ip`, `ip` (address, CIDR or `a-b` range), `port` (`443`,
`8000-8099`), `proto` (`tcp`, `17`), `decision`, `process`, `unit`, `user`, `reporter`,
`direction`.

Hooks: the what-if policy comes from `policy_loader()` and label data from
`inventory_loader()`; both are dependencies, so a deployment or a test can override them
(`app.dependency_overrides[policy_loader] = lambda: my_loader`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field
from sqlalchemy.orm import Session

from bulkhead.flows.store import FlowFilter, FlowStore
from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.errors import FieldError, Forbidden, Invalid
from bulkhead.server.schemas.policy import Input
from bulkhead.server.services import traffic as svc

router = APIRouter(tags=["traffic"])
TrafficReader = Annotated[Principal, Depends(require("traffic:read"))]
CONTROL = ("group_by", "order_by", "limit", "cursor", "order", "level", "approx")


def get_store(request: Request) -> FlowStore | None:
    return getattr(request.app.state, "flows", None)


def policy_loader() -> svc.PolicyLoader:
    """How what-if gets a `Policy` for "draft" / "active" / a version (overridable)."""
    return svc.load_policy


def inventory_loader() -> svc.InventoryLoader:
    """How label filters get the current workloads and labels (overridable)."""
    return svc.load_inventory


StoreDep = Annotated[FlowStore | None, Depends(get_store)]
PolicyLoaderDep = Annotated[svc.PolicyLoader, Depends(policy_loader)]
InventoryDep = Annotated[svc.InventoryLoader, Depends(inventory_loader)]
Limit = Annotated[int, Query(ge=1, le=svc.MAX_PAGE, description="rows per page")]
Cursor = Annotated[str | None, Query(max_length=2000, description="next_cursor of the "
                                                                  "previous page")]
GroupBy = Annotated[str | None, Query(
    max_length=1000, description="comma list: src_workload, dst_workload, workload, src_ip, "
                                 "dst_ip, proto, dst_port, port, process, unit, user, "
                                 "direction, reporter, decision, rule, src.KEY, dst.KEY")]
OrderBy = Annotated[str | None, Query(
    max_length=200, description="groups: flows, connections (default), bytes, sources, "
                                "first_seen, last_seen, or a group column")]
Order = Annotated[str, Query(pattern="^(asc|desc)$", description="flows: by time")]
Approx = Annotated[bool, Query(description="estimate distinct counts (sources, services): "
                                           "much cheaper over millions of groups")]


def _filters(request: Request) -> FlowFilter:
    return svc.parse_filters(request.query_params.multi_items(), ignore=CONTROL)


def _sync(session: Session, store: FlowStore | None, inventory: svc.InventoryLoader,
          filters: FlowFilter, group_by: tuple[str, ...] = (), level: str = "") -> None:
    if store is not None and svc.uses_labels(filters, group_by, level):
        svc.sync_labels(session=session, store=store, inventory=inventory)


@router.get("/traffic", summary="Flows, or flows grouped, filtered; paginated with no row cap")
def list_traffic(request: Request, session: SessionDep, store: StoreDep, _: TrafficReader,
                 inventory: InventoryDep, group_by: GroupBy = None, order_by: OrderBy = None,
                 limit: Limit = svc.DEFAULT_LIMIT, cursor: Cursor = None,
                 order: Order = "asc", approx: Approx = False) -> dict[str, Any]:
    filters = _filters(request)
    groups = svc.parse_group_by(group_by)
    _sync(session, store, inventory, filters, groups)
    if groups:
        return svc.group_flows(store=store, filters=filters, group_by=groups,
                               order_by=order_by or "connections", limit=limit, cursor=cursor,
                               approx=approx)
    return svc.list_flows(store=store, filters=filters, limit=limit, cursor=cursor,
                          newest_first=order == "desc")


@router.get("/traffic/export.csv", summary="The same query as CSV, streamed, every row",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}, "description": "CSV with a header"}})
def export_traffic(request: Request, session: SessionDep, store: StoreDep, _: TrafficReader,
                   inventory: InventoryDep, group_by: GroupBy = None,
                   order_by: OrderBy = None, approx: Approx = False) -> StreamingResponse:
    filters = _filters(request)
    groups = svc.parse_group_by(group_by)
    _sync(session, store, inventory, filters, groups)
    chunks = svc.export_csv(store=store, filters=filters, group_by=groups,
                            order_by=order_by or "connections", approx=approx)
    name = "traffic-groups.csv" if groups else "traffic.csv"
    return StreamingResponse(chunks, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/traffic/map", summary="Edges between workloads, label groups or addresses")
def traffic_map(request: Request, session: SessionDep, store: StoreDep, _: TrafficReader,
                inventory: InventoryDep,
                level: Annotated[str, Query(max_length=300, description="workload, ip, or "
                                            "label keys such as app or app,env")] = "workload",
                limit: Annotated[int | None, Query(ge=1)] = None,
                approx: Approx = False) -> dict[str, Any]:
    filters = _filters(request)
    _sync(session, store, inventory, filters, level=level)
    return svc.edges(store=store, filters=filters, level=level, limit=limit, approx=approx)


class WhatIfRequest(Input):
    """`filters` uses the query-parameter keys of `GET /traffic`; filter keys may also be
    given at the top level."""

    model_config = ConfigDict(extra="allow")
    policy: str = Field("draft", max_length=40, description="draft, active, or a version")
    filters: dict[str, str | int | list[str | int]] = Field(default_factory=dict)
    limit: int = Field(svc.DEFAULT_LIMIT, ge=1, le=svc.MAX_PAGE)
    cursor: str | None = Field(None, max_length=2000)
    summary: bool | None = Field(None, description="counts by decision, change and rule; "
                                                   "default: on the first page only")


@router.post("/traffic/what-if", summary="Stored flows evaluated against a policy version")
def what_if(body: WhatIfRequest, session: SessionDep, store: StoreDep,
            principal: TrafficReader, loader: PolicyLoaderDep,
            inventory: InventoryDep) -> dict[str, Any]:
    if not principal.can("policy:read"):
        raise Forbidden(f"{principal.label} lacks permission 'policy:read'")
    params: list[tuple[str, str]] = []
    extra = body.model_extra or {}
    for key, value in [*body.filters.items(), *extra.items()]:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str | int) or isinstance(v, bool):
                raise Invalid("invalid filter", [FieldError(f"filters.{key}",
                                                            "expected a string or number")])
            params.append((key, str(v)))
    filters = svc.parse_filters(params, where="filters")
    _sync(session, store, inventory, filters)
    return svc.what_if(session=session, store=store, ref=body.policy, filters=filters,
                       limit=body.limit, cursor=body.cursor, summary=body.summary,
                       loader=loader)
