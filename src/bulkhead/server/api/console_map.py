"""`GET /console/map`: the dependency map the console draws (edges decided under a policy).

Query: `policy` (`active` default, `draft`, or a version number), `label` (`KEY=V[,V]`,
repeatable: keep edges with an end carrying those labels), `limit` (edges, heaviest first),
and every flow filter of `GET /traffic` (`from`, `to`, `src.app`, `port`, …). Needs
`traffic:read`, and `policy:read` for anything but the active policy.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.errors import Forbidden
from bulkhead.server.services import console_map as svc
from bulkhead.server.services import traffic as traffic_svc

router = APIRouter(tags=["console"])
TrafficReader = Annotated[Principal, Depends(require("traffic:read"))]
CONTROL = ("policy", "label", "limit")


@router.get("/console/map", summary="Dependency map: edges decided under a policy")
def console_map(request: Request, session: SessionDep, principal: TrafficReader,
                policy: Annotated[str, Query(max_length=40, description="active, draft or a "
                                             "version number")] = "active",
                label: Annotated[list[str] | None, Query(
                    max_length=50, description="KEY=V[,V]: an end carries the label")] = None,
                limit: Annotated[int, Query(ge=1, le=svc.MAX_EDGES)] = svc.MAX_EDGES,
                ) -> Response:
    if policy.strip() != "active" and not principal.can("policy:read"):
        raise Forbidden(f"{principal.label} lacks permission 'policy:read'")
    filters = traffic_svc.parse_filters(request.query_params.multi_items(), ignore=CONTROL)
    labels = svc.parse_label_filter(label or [])
    body = svc.dependency_map(session=session, store=getattr(request.app.state, "flows", None),
                              ref=policy, filters=filters, labels=labels, limit=limit)
    # plain JSON types only: serialised directly (the generic encoder costs seconds at 20k edges)
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")
