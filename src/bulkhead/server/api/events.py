"""`GET /events` (what happened: provisioned, agent offline, tamper detected, policy apply
failed, …) and `GET /events/export` for a SIEM, as JSON lines or RFC 5424 syslog lines.

Exports are incremental: a collector remembers the last `id` it received and asks for
`after_id=<id>` next time. Event data is redacted when recorded (`services.audit.emit`) and
scrubbed again here with a broader rule, so an exported line never carries a secret.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from bulkhead.server.api.audit import (
    MAX_ID,
    FilterText,
    Limit,
    Offset,
    Page,
    Since,
    Until,
    paginate,
    text_filter,
    time_filters,
)
from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.models.audit import Event
from bulkhead.server.services.audit import redact

router = APIRouter(tags=["events"])
EventReader = Annotated[Principal, Depends(require("events:read"))]

SEVERITIES = ("info", "warning", "error", "critical")
# RFC 5424 severity numbers
SYSLOG_SEVERITY = {"critical": 2, "error": 3, "warning": 4, "info": 6}
# RFC 5612 documentation enterprise number; replace if the project registers its own
SD_ID = "bulkhead@32473"
_SECRETISH = re.compile(r"pass(word|wd|phrase)|secret|token|credential|authori[sz]ation|"
                        r"private_?key|api_?key|cookie", re.IGNORECASE)


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    syslog = "syslog"


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: datetime
    kind: str
    severity: str
    subject: str
    data: dict[str, Any]


def scrub(data: Any) -> Any:
    """`redact`, plus any key that merely looks like it names a secret."""
    data = redact(data)
    if isinstance(data, dict):
        return {k: ("<redacted>" if _SECRETISH.search(str(k)) else scrub(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [scrub(v) for v in data]
    return data


def _public(ev: Event) -> EventPublic:
    return EventPublic(id=ev.id, at=ev.at, kind=ev.kind, severity=ev.severity,
                       subject=ev.subject, data=scrub(ev.data or {}))


def _query(kind: str | None, severity: str | None, subject: str | None,
           since: datetime | None, until: datetime | None) -> Any:
    q = select(Event)
    if kind is not None:
        q = q.where(text_filter(Event.kind, kind))
    if severity is not None:
        q = q.where(Event.severity == severity)
    if subject is not None:
        q = q.where(text_filter(Event.subject, subject))
    for cond in time_filters(Event.at, since, until):
        q = q.where(cond)
    return q


Severity = Annotated[str | None, Query(pattern=f"^({'|'.join(SEVERITIES)})$")]


@router.get("/events", response_model=Page[EventPublic], summary="Events, newest first")
def list_events(session: SessionDep, _: EventReader, kind: FilterText = None,
                severity: Severity = None, subject: FilterText = None, since: Since = None,
                until: Until = None, limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    q = _query(kind, severity, subject, since, until).order_by(Event.id.desc())
    rows, total = paginate(session, q, limit=limit, offset=offset)
    return {"items": [_public(r) for r in rows], "total": total, "limit": limit,
            "offset": offset}


@router.get("/events/export", response_class=PlainTextResponse,
            summary="Events for a SIEM, oldest first: JSON lines or RFC 5424 syslog",
            responses={200: {"content": {"application/x-ndjson": {}, "text/plain": {}},
                             "description": "one event per line"}})
def export_events(session: SessionDep, _: EventReader,
                  format: Annotated[ExportFormat, Query()] = ExportFormat.jsonl,
                  after_id: Annotated[int, Query(ge=0, le=MAX_ID,
                                                 description="only events after this id")] = 0,
                  kind: FilterText = None, severity: Severity = None,
                  since: Since = None, until: Until = None,
                  limit: Annotated[int, Query(ge=1, le=50_000)] = 10_000,
                  facility: Annotated[int, Query(ge=0, le=23,
                                                 description="syslog facility")] = 13,
                  ) -> Response:
    q = _query(kind, severity, None, since, until).where(Event.id > after_id)
    rows = list(session.scalars(q.order_by(Event.id).limit(limit)))
    events = [_public(r) for r in rows]
    if format is ExportFormat.syslog:
        host = _sd_safe_token(socket.gethostname(), 255)
        body = "".join(syslog_line(e, facility=facility, hostname=host) + "\n" for e in events)
        return PlainTextResponse(body, media_type="text/plain; charset=utf-8")
    body = "".join(jsonl_line(e) + "\n" for e in events)
    return Response(body, media_type="application/x-ndjson")


def jsonl_line(ev: EventPublic) -> str:
    doc = ev.model_dump(mode="json")
    return json.dumps(doc, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def _sd_safe_token(text: str, limit: int) -> str:
    """A syslog header field: printable US-ASCII without spaces, or `-` when empty."""
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]
    return out or "-"


def _sd_value(text: str) -> str:
    """An SD-PARAM value (RFC 5424 §6.3.3): escape `"`, `\\` and `]`; no control chars."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_line(ev: EventPublic, *, facility: int = 13, hostname: str = "-") -> str:
    """`<PRI>1 TIMESTAMP HOSTNAME bulkhead - MSGID [SD] MSG` with the event data as JSON."""
    pri = facility * 8 + SYSLOG_SEVERITY.get(ev.severity, 5)
    ts = ev.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    msgid = _sd_safe_token(ev.kind, 32)
    sd = (f'[{SD_ID} id="{ev.id}" kind="{_sd_value(ev.kind)}" '
          f'severity="{_sd_value(ev.severity)}" subject="{_sd_value(ev.subject)}"]')
    msg = json.dumps(ev.data, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return f"<{pri}>1 {ts} {hostname} bulkhead - {msgid} {sd} {msg}"
