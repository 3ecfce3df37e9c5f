"""`GET /audit`: the audit log, read-only. There is deliberately no route that creates, edits or
deletes an entry (PUT/PATCH/DELETE/POST answer 405); entries are written only by the services,
inside the transaction of the change they record.

Also the small query helpers shared by the read-only list endpoints (`/audit`, `/events`):
a page envelope, bounded pagination, text filters with a trailing `*` for prefix matching, and
time-range bounds that must carry a time zone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict
from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from bulkhead.server.auth import Principal
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.errors import NotFound
from bulkhead.server.models.audit import AuditEntry

router = APIRouter(tags=["audit"])

T = TypeVar("T")
MAX_ID = 2**31 - 1  # ids are 32-bit integers in PostgreSQL
AuditReader = Annotated[Principal, Depends(require("audit:read"))]

# -- shared query helpers --------------------------------------------------------------------

FilterText = Annotated[str | None, Query(max_length=300, pattern=r"^[^\x00-\x1f\x7f]*$",
                                         description="exact match; a trailing * matches a "
                                                     "prefix")]
Since = Annotated[AwareDatetime | None, Query(description="at or after (RFC 3339, with zone)")]
Until = Annotated[AwareDatetime | None, Query(description="before (RFC 3339, with zone)")]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


def utc(value: datetime) -> datetime:
    """`value` in UTC, clamped to the representable range (absurd offsets never 500)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if value.year > 1 else datetime.min.replace(
            tzinfo=UTC)


def text_filter(column: InstrumentedAttribute[str], value: str) -> ColumnElement[bool]:
    if value.endswith("*"):
        stem = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(f"{stem}%", escape="\\")
    return column == value


def time_filters(column: InstrumentedAttribute[datetime], since: datetime | None,
                 until: datetime | None) -> list[ColumnElement[bool]]:
    out = []
    if since is not None:
        out.append(column >= utc(since))
    if until is not None:
        out.append(column < utc(until))
    return out


def paginate(session: Session, query: Select[Any], *, limit: int,
             offset: int) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, int(total or 0)


# -- the audit log ---------------------------------------------------------------------------

class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    note: str | None


@router.get("/audit", response_model=Page[AuditPublic],
            summary="Audit log, newest first (filters: actor, action, target, time range)")
def list_audit(session: SessionDep, _: AuditReader, actor: FilterText = None,
               action: FilterText = None, target: FilterText = None, since: Since = None,
               until: Until = None, limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc())
    for column, value in ((AuditEntry.actor, actor), (AuditEntry.action, action),
                          (AuditEntry.target, target)):
        if value is not None:
            q = q.where(text_filter(column, value))
    for cond in time_filters(AuditEntry.at, since, until):
        q = q.where(cond)
    rows, total = paginate(session, q, limit=limit, offset=offset)
    return {"items": [AuditPublic.model_validate(r) for r in rows], "total": total,
            "limit": limit, "offset": offset}


@router.get("/audit/{entry_id}", response_model=AuditPublic, summary="One audit entry")
def get_audit(session: SessionDep, _: AuditReader,
              entry_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> AuditEntry:
    entry = session.get(AuditEntry, entry_id)
    if entry is None:
        raise NotFound(f"audit entry {entry_id} not found")
    return entry
