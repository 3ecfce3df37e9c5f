"""Operations: Prometheus metrics.

`GET /metrics` is served twice, from the same handler: `router` (mounted under `/api/v1`, so
`/api/v1/metrics`, in the OpenAPI schema) and `root_router` (for mounting without a prefix, so
`/metrics`, where scrapers look by default). Both need a bearer credential with a read
permission (`agents:read`, which every user role holds and agents do not): give Prometheus an
API key of a viewer. Metrics name routes, agent counts and the policy version; that is little,
but a security product should not hand even that to anonymous callers.

`/healthz` (unauthenticated, liveness only) is defined in `bulkhead.server.app`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session

from bulkhead.server import metrics
from bulkhead.server.auth import Principal
from bulkhead.server.db import utcnow
from bulkhead.server.deps import SessionDep, get_settings, require

router = APIRouter(tags=["operations"])
root_router = APIRouter(tags=["operations"])
MetricsReader = Annotated[Principal, Depends(require("agents:read"))]

_SEEN_FIELDS = ("last_heartbeat_at", "last_heartbeat", "last_seen_at", "last_seen")


def _agent_counts(session: Session, offline_after_s: float) -> dict[str, int] | None:
    """Agents by state (`online`, `offline`, `unpaired`), from the agents table if that module
    exists (else None). Uses the model's `online` flag (kept by the heartbeat monitor), or
    failing that its last heartbeat against `offline_after_s`."""
    try:
        from bulkhead.server.models import agents as agent_models
    except ImportError:
        return None
    model: Any = getattr(agent_models, "Agent", None)
    if model is None:
        return None
    paired: Any = getattr(model, "state", None)
    online: Any = getattr(model, "online", None)
    seen: Any = next((getattr(model, f) for f in _SEEN_FIELDS if hasattr(model, f)), None)
    if online is None and seen is None:
        if paired is None:
            return None
        rows = session.execute(select(paired, func.count()).group_by(paired)).all()
        return {str(s): int(n) for s, n in rows}
    counts = {"online": 0, "offline": 0}
    cols = [paired if paired is not None else literal("paired"),
            online if online is not None else seen]
    now = utcnow()
    for state, flag in session.execute(select(*cols)):
        if state == "unpaired":
            label = "unpaired"
        elif online is not None:
            label = "online" if flag else "offline"
        else:
            fresh = flag is not None and (now - flag).total_seconds() <= offline_after_s
            label = "online" if fresh else "offline"
        counts[label] = counts.get(label, 0) + 1
    return counts


def metrics_text(request: Request, session: SessionDep, _: MetricsReader) -> Response:
    settings = get_settings(request)
    counts = _agent_counts(session, settings.agent_offline_after_s)
    if counts is not None:
        metrics.AGENTS.clear()
        for state, n in counts.items():
            metrics.AGENTS.labels(state).set(n)
    policy = getattr(request.app.state, "policy", None)
    version = getattr(policy, "version", None)
    metrics.POLICY_VERSION.set(version or 0)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
              "description": "Prometheus text exposition format"}}
router.add_api_route("/metrics", metrics_text, methods=["GET"], response_class=Response,
                     summary="Prometheus metrics", responses=_DOC)
root_router.add_api_route("/metrics", metrics_text, methods=["GET"], response_class=Response,
                          include_in_schema=False)
